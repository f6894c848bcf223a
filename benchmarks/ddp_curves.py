"""Distillation loss curves on one process and on two DDP processes (gloo, CPU), side by side.

The tiny random Llama of the tests (student seed 1, teacher seed 0, 4-bit grid and 60% mask
kept), TSLD + 0.5 CE, global batch 4 of 24-token crops, float32 (amp off), `--steps` steps.
Both runs draw the same global batches; the two processes each train on half of every batch.

    python benchmarks/ddp_curves.py [--steps 30]

Writes benchmarks/results/ddp.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _run(steps: int) -> list[float]:
    from conftest import build_tiny_llama

    from frugalflow.arch import compressible_linears
    from frugalflow.distill.trainer import distill
    from frugalflow.quant import rtn

    student, teacher = build_tiny_llama(seed=1), build_tiny_llama(seed=0)
    g = torch.Generator().manual_seed(7)
    masks, grids = {}, {}
    for n, m in compressible_linears(student).items():
        masks[n] = torch.rand(m.weight.shape, generator=g) < 0.6
        grids[n] = (*rtn.compute_qparams(m.weight.detach() * masks[n], 4, 32, symmetric=False), 4, 32)
    windows = torch.randint(0, 384, (6, 40), generator=torch.Generator().manual_seed(0))
    losses: list[float] = []
    distill(student, teacher, windows, steps=steps, lr=5e-3, batch_size=4, seq_len=24, warmup_steps=1, seed=3,
            amp=False, loss="tsld", loss_weights={"tsld": 1.0, "ce": 0.5}, masks=masks, grids=grids,
            on_step=lambda s, m: losses.append(m["loss"]))
    return losses


def _rank(rank: int, store: str, out: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        losses = _run(steps)
        if rank == 0:
            Path(out).write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    one = _run(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "two.json"
        mp.spawn(_rank, args=(str(Path(tmp) / "store"), str(out), args.steps), nprocs=2, join=True)
        two = json.loads(out.read_text())
    rel = [abs(a - b) / abs(a) for a, b in zip(one, two)]
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps, "one_process": one,
              "two_processes": two, "max_relative_difference": max(rel)}
    results = ROOT / "benchmarks" / "results"
    (results / "ddp.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Distillation loss, 1 process vs 2 DDP processes (gloo, CPU), {report['date']}", "",
             "Tiny random Llama, TSLD + 0.5 CE, global batch 4 x 24 tokens, float32, mask and 4-bit grid kept.",
             f"Largest relative difference over {args.steps} steps: {max(rel):.2e}.", "",
             "| step | 1 process | 2 processes | relative difference |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {a:.6f} | {b:.6f} | {r:.1e} |" for i, (a, b, r) in enumerate(zip(one, two, rel))]
    (results / "ddp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
