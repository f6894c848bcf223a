"""Layer-streaming quantization against model size: peak RSS and seconds per layer.

Builds random-weight Llama models of one family at three sizes (SmolLM2-135M-shaped ~0.1B,
TinyLlama-shaped ~1.1B, Llama-2-7B-shaped: hidden 4096, MLP 11008, 32 heads, 32 layers), stored
bf16 in ~2 GB safetensors shards (every layer holds the same random tensors: only
shapes matter here), then runs `frugalflow.streaming.stream_quantize` (RTN and GPTQ,
4-bit g64, a few short random-token calibration windows) on each in a fresh process and records
its peak RSS (ru_maxrss) and seconds per layer. Where /sys/fs/cgroup/memory (cgroup v1) lets us,
the largest model runs under a memory limit smaller than its size. Models are deleted afterwards.

    python benchmarks/scale.py --workdir DIR [--sizes 0.1B,1B,7B] [--layers 7B:rtn=8,7B:gptq=2,1B:gptq=8]

Writes benchmarks/results/scale.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZES = {  # name -> LlamaConfig fields
    "0.1B": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}
CGROUP = Path("/sys/fs/cgroup/memory")


def build(path: Path, fields: dict, shard_bytes: int = 2 << 30, seed: int = 0) -> int:
    """A random bf16 Llama in `path` (config + shards + index), written shard by shard; returns its bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**fields, max_position_embeddings=2048, dtype="bfloat16")
    path.mkdir(parents=True)
    config.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    h, m, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim

    pool: dict[tuple, torch.Tensor] = {}

    def randn(*shape):  # one random tensor per shape, shared by the layers: writing, not sampling, is the cost
        if shape not in pool:
            pool[shape] = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
        return pool[shape].clone()  # safetensors stores no shared memory

    tensors = [("model.embed_tokens.weight", lambda: randn(config.vocab_size, h)),
               ("model.norm.weight", lambda: torch.ones(h, dtype=torch.bfloat16))]
    if not config.tie_word_embeddings:
        tensors.append(("lm_head.weight", lambda: randn(config.vocab_size, h)))
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", lambda: torch.ones(h, dtype=torch.bfloat16)),
                    (p + "post_attention_layernorm.weight", lambda: torch.ones(h, dtype=torch.bfloat16)),
                    (p + "self_attn.q_proj.weight", lambda: randn(config.num_attention_heads * config.head_dim, h)),
                    (p + "self_attn.k_proj.weight", lambda kv=kv: randn(kv, h)),
                    (p + "self_attn.v_proj.weight", lambda kv=kv: randn(kv, h)),
                    (p + "self_attn.o_proj.weight", lambda: randn(h, config.num_attention_heads * config.head_dim)),
                    (p + "mlp.gate_proj.weight", lambda: randn(m, h)),
                    (p + "mlp.up_proj.weight", lambda: randn(m, h)),
                    (p + "mlp.down_proj.weight", lambda: randn(h, m))]
    shards, current, size, total = [], {}, 0, 0
    for name, make in tensors:
        t = make()
        current[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            save_file(current, path / f"part-{len(shards):05d}.safetensors", metadata={"format": "pt"})
            total += size
            current, size = {}, 0
            shards[-1] = list(shards[-1])
    if current:
        shards.append(current)
        save_file(current, path / f"part-{len(shards):05d}.safetensors", metadata={"format": "pt"})
        total += size
        shards[-1] = list(shards[-1])
    weight_map = {n: f"part-{k + 1:05d}.safetensors" for k, names in enumerate(shards) for n in names}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def run_one(args) -> None:
    """Child process: stream-quantize one model, print one JSON line with its own peak RSS."""
    torch.manual_seed(0)
    from frugalflow.streaming import stream_quantize

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    calib = torch.randint(0, cfg["vocab_size"], (args.windows, args.window_len), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    stats = stream_quantize(args.model, args.out, args.method, calib, bits=4, group_size=64, symmetric=False,
                            batch_size=args.windows, layers=args.layers or None,
                            on_progress=lambda i, n, info: print(f"layer {i + 1}/{n} {info['seconds']:.1f} s",
                                                                 file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"peak_rss_bytes": peak, "seconds": seconds, "seconds_per_layer": stats["seconds_per_layer"],
                      "out_bytes": sum(p.stat().st_size for p in Path(args.out).glob("*.safetensors"))
                      if Path(args.out).is_dir() else None}))


def _cgroup(limit_bytes: int) -> Path | None:
    """A cgroup v1 memory group with that limit, or None where the machine does not allow one."""
    if not (CGROUP / "memory.limit_in_bytes").is_file():
        return None
    group = CGROUP / f"frugalflow-scale-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return group
    except OSError:
        return None


def measure(model: Path, method: str, workdir: Path, layers: int, limit: int | None, log) -> dict:
    out = workdir / f"out-{model.name}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "_run", "--model", str(model), "--method", method, "--out", str(out),
           "--layers", str(layers)]
    group = _cgroup(limit) if limit else None

    def enter():  # the child joins the cgroup before it loads anything
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter, cwd=ROOT)
    log.write(proc.stderr)
    log.flush()
    shutil.rmtree(out, ignore_errors=True)
    result = {"method": method, "rc": proc.returncode, "layers_run": layers or None,
              "memory_limit_bytes": limit if group is not None else None}
    if group is not None:
        result["cgroup_max_usage_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
        result["cgroup_failcnt"] = int((group / "memory.failcnt").read_text())
        group.rmdir()
    if proc.returncode == 0:
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        result["error"] = proc.stderr[-2000:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    child = sub.add_parser("_run")
    child.add_argument("--model")
    child.add_argument("--method")
    child.add_argument("--out")
    child.add_argument("--layers", type=int, default=0)
    child.add_argument("--windows", type=int, default=4)
    child.add_argument("--window-len", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--sizes", default="0.1B,1B,7B")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--layers", default="7B:rtn=8,7B:gptq=2,1B:gptq=8",
                        help="SIZE:METHOD=N: time only the first N layers of that run (default: all layers)")
    parser.add_argument("--name", default="scale", help="results file name: benchmarks/results/NAME.{json,md}")
    parser.add_argument("--limit-gb-7b", type=float, default=4.0, help="cgroup memory limit for the 7B runs")
    args = parser.parse_args()
    if args.cmd == "_run":
        return run_one(args)
    if args.workdir is None:
        parser.error("--workdir is needed (it holds the generated models; ~14 GB for 7B)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = open(args.workdir / "scale.log", "a")
    limits = {k: int(v) for k, v in (item.split("=") for item in args.layers.split(",") if item)}
    rows = []
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{cpu_model()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "settings": "4-bit, group 64, asymmetric; GPTQ: 4 random-token windows of "
              "128 tokens, batch 4; models: random bf16 weights", "rows": rows}
    for size in args.sizes.split(","):
        path = args.workdir / f"llama-{size}"
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        nbytes = build(path, SIZES[size])
        fields = SIZES[size]
        n_params = nbytes // 2
        log.write(f"built {size}: {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s\n")
        log.flush()
        for method in args.methods.split(","):
            layers = limits.get(f"{size}:{method}", 0)
            limit = int(args.limit_gb_7b * 1e9) if size == "7B" else None
            r = measure(path, method, args.workdir, layers, limit, log)
            r.update(size=size, n_params=n_params, model_bytes=nbytes, n_layers=fields["num_hidden_layers"],
                     hidden=fields["hidden_size"], intermediate=fields["intermediate_size"],
                     load_avg_1m=os.getloadavg()[0])
            rows.append(r)
            log.write(json.dumps({k: v for k, v in r.items() if k != "error"}) + "\n")
            log.flush()
            RESULTS.mkdir(parents=True, exist_ok=True)  # after every run: a long benchmark keeps what it measured
            (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
            (RESULTS / f"{args.name}.md").write_text(markdown(report))
        shutil.rmtree(path, ignore_errors=True)
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"# Layer-streaming quantization vs model size ({report['date']}, {report['machine']})", "",
             report["settings"], "",
             "| model | params | bf16 on disk | method | layers timed | peak RSS | s/layer (median) | "
             "memory limit | load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["rows"], key=lambda r: (r["model_bytes"], r["method"])):
        if r.get("rc") != 0:
            lines.append(f"| {r['size']} | | | {r['method']} | failed (rc {r['rc']}) | | | | |")
            continue
        spl = sorted(r["seconds_per_layer"])
        limit = f"{r['memory_limit_bytes'] / 1e9:.1f} GB (cgroup)" if r.get("memory_limit_bytes") else "none"
        lines.append(f"| {r['size']} ({r['n_layers']}x h{r['hidden']}/mlp{r['intermediate']}) | "
                     f"{r['n_params'] / 1e9:.2f}B | {r['model_bytes'] / 1e9:.1f} GB | {r['method']} | "
                     f"{len(spl)}/{r['n_layers']} | {r['peak_rss_bytes'] / 1e9:.2f} GB | {spl[len(spl) // 2]:.1f} | "
                     f"{limit} | {r['load_avg_1m']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
