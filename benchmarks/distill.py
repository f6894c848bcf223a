"""Distillation on SmolLM2-135M: how much of the compression's perplexity gap TSLD and KL win back.

    python benchmarks/distill.py [--steps 180] [--lr 5e-4] [--ce-weight 0.5] [--structured-steps 150]
                                 [--ablation [kl_ce] [tsld_only]] [--rounds 9] [--out benchmarks/results]

Same protocol and work folder as prune_quant.py (it reuses its base model, data and
SparseGPT-50% output). Compressed = SparseGPT 50% -> AWQ w4 g64 asymmetric. Then, from the
dense teacher, same steps and settings, on the train and calibration windows (the stage
default; evaluation windows are never trained on):
- TSLD as its authors train it (the reference implementation's `tsld` option): the
  token-scaled logit loss plus the ground-truth cross-entropy (`ce_weight`);
- plain KL (their `logit` option: the logit loss alone);
- the ablation that says where a difference comes from: KL + the same cross-entropy term,
  and TSLD without it (`--ablation kl_ce tsld_only`; off by default: each costs as much as a run).
180 steps keep each run inside the 30-minute budget on the slowest host seen (about 8 s/step
on 2026-12-02's; 300 steps took 19-25 min on earlier ones).
Structured: 25% of the width (MLP channels, attention heads as whole KV groups, embedding
channels) pruned, distilled with TSLD, decode tokens/s against dense (fp32 and bf16,
interleaved rounds, medians; each model at its faster dtype). Writes distill.json and distill.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from frugalflow import config as C  # noqa: E402
from frugalflow.data import load_windows, prepare_data  # noqa: E402
from frugalflow.evaluate.perplexity import perplexity  # noqa: E402
from frugalflow.evaluate.speed import interleaved_decode_tps  # noqa: E402
from frugalflow.fetch_model import fetch_model  # noqa: E402
from frugalflow.models import load_model, load_tokenizer  # noqa: E402
from frugalflow.stages import run_stage  # noqa: E402

# 25% of the width, Minitron's three width axes: a quarter of the MLP channels, of the attention
# heads (one of the three KV groups with its query heads) and of the embedding channels, ranked by
# activation importance on the calibration windows.
STRUCTURED = {"method": "structured", "mlp_ratio": 0.25, "heads_ratio": 0.25, "heads_mode": "groups",
              "hidden_ratio": 0.25}


def stage(spec: dict):
    return C.Recipe.model_validate({"stages": [spec]}).stages[0]


def named(work: Path, prefix: str, spec: dict, src: Path) -> Path:
    """An output folder named by what it holds: a changed setting never reuses an old result."""
    key = hashlib.sha1(json.dumps([spec, src.name], sort_keys=True).encode()).hexdigest()[:8]
    return work / f"{prefix}_{key}"


def compress(spec: dict, src: Path, out: Path, base: Path, data: Path, pruned: bool = False) -> dict:
    stats_file = out.with_suffix(".stats.json")
    if (out / "config.json").is_file():  # done earlier (by this script or prune_quant.py)
        return json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    print(f"{out.name}: {spec}", flush=True)

    def report(message: str, metrics: dict) -> None:
        if "step" in metrics and metrics["step"] % 25:
            return
        print(f"  {out.name}: {message}", flush=True)

    stats = run_stage(stage(spec), src, out, data_dir=data, teacher_dir=base, pruned=pruned, report=report)
    stats_file.write_text(json.dumps({k: v for k, v in stats.items() if not isinstance(v, dict)}))
    return stats


def decode_race(paths: dict[str, Path], tokenizer, rounds: int) -> dict:
    """Decode tokens/s of each model in fp32 and in bf16, all four interleaved in every round (medians).

    Which dtype is faster depends on the host's CPU (dense bf16 decoded 1.6x faster than fp32 on
    2026-11-22's host and slower on 2026-12-02's), so each model is judged at its faster
    dtype: `structured_decode_ratio` = structured's best / dense's best. The same-dtype ratios
    are reported too."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    models = {f"{name}_{d}": load_model(path, dtype=dt) for name, path in paths.items() for d, dt in dtypes.items()}
    tps = interleaved_decode_tps(models, tokenizer, "The Python language reference says that", rounds)
    result = {f"{name}_decode_tps_{d}": round(tps[f"{name}_{d}"], 2) for name in paths for d in dtypes}
    result.update({f"structured_decode_ratio_{d}": round(tps[f"structured_{d}"] / tps[f"dense_{d}"], 3)
                   for d in dtypes})
    for name in paths:
        best = max(dtypes, key=lambda d: tps[f"{name}_{d}"])
        result.update({f"{name}_decode_dtype": best, f"{name}_decode_tps": round(tps[f"{name}_{best}"], 2)})
    result["structured_decode_ratio"] = round(max(tps[f"structured_{d}"] for d in dtypes)
                                              / max(tps[f"dense_{d}"] for d in dtypes), 3)
    result["decode_load_average"] = round(os.getloadavg()[0], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=180)
    parser.add_argument("--structured-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ce-weight", type=float, default=0.5,
                        help="weight of the ground-truth cross-entropy term trained with TSLD")
    parser.add_argument("--ablation", nargs="*", choices=["kl_ce", "tsld_only"], default=[],
                        help="extra runs: KL + the same cross-entropy term (kl_ce), TSLD without it (tsld_only)")
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    work = Path(args.work)
    base, data = work / "base", work / "data"
    if not (base / "config.json").is_file():
        fetch_model(C.BaseModelConfig(), base)
    if not (data / "train.safetensors").is_file() or len(load_windows(data, "train")) == 0:
        prepare_data(C.DataConfig(calib_windows=32, train_windows=64, eval_windows=40, path=str(data)), base)
    eval_windows = load_windows(data, "eval")[:40]

    train = {"steps": args.steps, "lr": args.lr, "warmup_steps": 20, "batch_size": 2, "seq_len": 256}
    sparse = work / "sparsegpt50"
    compress({"method": "sparsegpt", "sparsity": 0.5}, base, sparse, base, data)
    compressed = work / "sparsegpt50_awq"
    compress({"method": "awq", "bits": 4, "group_size": 64}, sparse, compressed, base, data)
    runs = {"tsld": {"method": "tsld", **train, "ce_weight": args.ce_weight}, "kl": {"method": "kl", **train}}
    ablation = {"kl_ce": {"method": "kl", **train, "ce_weight": args.ce_weight}, "tsld_only": {"method": "tsld", **train}}
    runs.update({k: ablation[k] for k in args.ablation})
    ce = f"{args.ce_weight} x ground-truth cross-entropy"
    run_names = {"tsld": f"token-scaled logit loss (tau 10) + {ce}, as the TSLD authors train it",
                 "kl": "the logit loss alone", "kl_ce": f"KL + {ce}", "tsld_only": "TSLD alone"}
    # structured first, then the long part: the distillation runs of the compressed model
    structured = named(work, "structured25", STRUCTURED, base)
    compress(STRUCTURED, base, structured, base, data)
    structured_train = {**runs["tsld"], "steps": args.structured_steps}
    structured_tsld = named(work, "structured25_tsld", structured_train, structured)
    compress(structured_train, structured, structured_tsld, base, data)
    structured_ppl = perplexity(load_model(structured_tsld), eval_windows)

    dense_ppl = perplexity(load_model(base), eval_windows)
    compressed_ppl = perplexity(load_model(compressed), eval_windows)
    trained, ppl = {}, {}
    for key, spec in runs.items():
        out = named(work, f"distill_{key}", spec, compressed)
        trained[key] = compress(spec, compressed, out, base, data, True)
        ppl[key] = perplexity(load_model(out), eval_windows)
        print(f"{key}: ppl {ppl[key]:.3f}", flush=True)
    tsld, kl = trained["tsld"], trained["kl"]
    gap = compressed_ppl - dense_ppl
    # decode last, after all training, so that no training shares the cores with the timing
    decode = decode_race({"dense": base, "structured": structured_tsld}, load_tokenizer(base), args.rounds)
    print(f"structured: ppl {structured_ppl:.3f}; decode {decode}", flush=True)

    result = {
        "dense_ppl": round(dense_ppl, 3), "compressed_ppl": round(compressed_ppl, 3),
        **{f"{k}_ppl": round(v, 3) for k, v in ppl.items()}, "steps": args.steps, "lr": args.lr,
        "ce_weight": args.ce_weight, "train_windows": tsld.get("train_windows"),
        **{f"recovered_share_{k}": round((compressed_ppl - v) / gap, 3) for k, v in ppl.items()},
        "seconds_per_step": round(tsld["seconds_per_step"], 2), "kl_seconds_per_step": round(kl["seconds_per_step"], 2),
        "train_seconds_tsld": round(tsld["seconds"], 1),
        "structured_ppl": round(structured_ppl, 3), "structured_steps": args.structured_steps,
        **decode,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill.json").write_text(json.dumps(result, indent=1) + "\n")
    machine = f"{describe()}, load average {os.getloadavg()[0]:.1f}"
    lines = ["# Distillation, SmolLM2-135M-Instruct", "", f"Machine: {machine}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Compressed: SparseGPT 50% + AWQ w4 g64. Training: {args.steps} steps, batch 2 x 256 tokens, "
             f"lr {args.lr}, 20 warmup steps, cosine decay, bf16 autocast, mask and grid kept, "
             f"{tsld.get('train_windows')} windows of 512 tokens (train + calibration splits).",
             "; ".join(f"{k}: {run_names[k]}" for k in runs) + ".",
             f"Structured: {STRUCTURED} then TSLD for {args.structured_steps} steps; decode: 64 new tokens, "
             f"batch 1, greedy, fp32 and bf16, median of {args.rounds} rounds with all four interleaved; "
             f"`structured_decode_ratio` compares each model at its faster dtype.", "",
             "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result.items()]
    (out / "distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
