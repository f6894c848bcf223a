"""Pruning and quantization on SmolLM2-135M: one table, every method side by side.

    python benchmarks/prune_quant.py [--methods dense,rtn_w4g64,...] [--out benchmarks/results]

Protocol (shared with the reference figures): pydoc topics split by sha1(key) % 5, 512-token
windows, the first 32 calibration windows, perplexity on the evaluation windows (the first
40; the split holds 24). Each method compresses in its own subprocess, so its seconds and
peak memory (max RSS) are its own; perplexity and decode speed are then measured in one
process, decode interleaved over rounds so that machine noise hits every method alike
(median of the rounds). Writes prune_quant.json (records: method, ppl, compress_s,
peak_mem_mb, size_mb, decode_tps, decode_ratio_bf16) and prune_quant.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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
from frugalflow.models import load_model, load_tokenizer, weights_size_mb  # noqa: E402
from frugalflow.stages import run_stage  # noqa: E402

W4 = {"bits": 4, "group_size": 64, "symmetric": False}
METHODS: dict[str, dict | None] = {
    "dense": None,
    "magnitude50": {"method": "magnitude", "sparsity": 0.5},
    "wanda50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt50": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt24": {"method": "sparsegpt", "pattern": "2:4"},
    "rtn_w4g64": {"method": "rtn", **W4},
    "gptq_w4g64": {"method": "gptq", **W4, "act_order": True},  # as llm-compressor's default (static) order
    "awq_w4g64": {"method": "awq", **W4},
    "dynamic_int8": {"method": "dynamic_int8"},
    "static_int8": {"method": "static_int8"},
}
# llm-compressor 0.14.0.1 on this machine, same model and protocol (the table)
REFERENCE = {"dense": (12.24, None), "wanda50": (31.61, 80), "sparsegpt50": (21.85, 144),
             "sparsegpt24": (43.09, 127), "rtn_w4g64": (16.24, 69), "gptq_w4g64": (13.69, 117),
             "awq_w4g64": (14.28, 911)}


def compress_one(name: str, base: Path, data: Path, work: Path) -> dict:
    """Runs in a child process: compress with one method, report seconds and peak RSS."""
    spec = METHODS[name]
    stage = C.Recipe.model_validate({"stages": [spec]}).stages[0]
    out = work / name
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    run_stage(stage, base, out, data_dir=data, teacher_dir=base, device="cpu")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": name, "compress_s": round(seconds, 1), "peak_mem_mb": round(peak),
            "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved decode rounds")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    base, data = work / "base", work / "data"
    if args.one:
        print(json.dumps(compress_one(args.one, base, data, work)))
        return
    if not (base / "config.json").is_file():
        fetch_model(C.BaseModelConfig(), base)
    if not (data / "eval.safetensors").is_file():
        prepare_data(C.DataConfig(calib_windows=32, train_windows=64, eval_windows=40, path=str(data)), base)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; allowed: {', '.join(METHODS)}")

    records = {}
    for name in names:
        if METHODS[name] is None:
            records[name] = {"method": name, "compress_s": 0.0, "peak_mem_mb": None}
            continue
        if not (work / name / "config.json").is_file():
            print(f"[{name}] compressing ...", flush=True)
            done = subprocess.run([sys.executable, __file__, "--one", name, "--work", str(work)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            records[name] = json.loads(done.stdout.strip().splitlines()[-1])
            (work / f"{name}.timing.json").write_text(json.dumps(records[name]))
        else:
            records[name] = json.loads((work / f"{name}.timing.json").read_text())
        print(f"[{name}] {records[name]['compress_s']} s, peak {records[name]['peak_mem_mb']} MB", flush=True)

    windows = load_windows(data, "eval")[:40]
    tokenizer = load_tokenizer(base)
    model_dir = {n: base if METHODS[n] is None else work / n for n in names}
    for name in names:
        model = load_model(model_dir[name])
        records[name]["ppl"] = round(perplexity(model, windows), 3)
        records[name]["size_mb"] = round(weights_size_mb(model_dir[name]), 1)
        print(f"[{name}] ppl {records[name]['ppl']}, {records[name]['size_mb']} MB", flush=True)
        del model

    # decode: bf16 dense is the yardstick; every model measured once per round, interleaved
    prompt = "The Python language reference says that"
    loaded = {"bf16_dense": load_model(base, dtype=torch.bfloat16)}
    for name in names:
        loaded[name] = load_model(model_dir[name], dtype=torch.bfloat16)
    tps = interleaved_decode_tps(loaded, tokenizer, prompt, args.rounds)
    bf16 = tps["bf16_dense"]
    for name in names:
        records[name]["decode_tps"] = round(tps[name], 2)
        records[name]["decode_ratio_bf16"] = round(tps[name] / bf16, 3)

    fields = ("method", "ppl", "compress_s", "peak_mem_mb", "size_mb", "decode_tps", "decode_ratio_bf16", "load_avg")
    rows = [{f: records[n].get(f) for f in fields} for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_quant.json").write_text(json.dumps(rows, indent=1) + "\n")
    machine = f"{describe()}, load average before decode {os.getloadavg()[0]:.1f}"
    dense_ppl = records.get("dense", {}).get("ppl")
    lines = ["# Pruning and quantization, SmolLM2-135M-Instruct", "",
             f"Machine: {machine}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Decode: HF generate, 64 new tokens, batch 1, greedy, every model in bf16 activations, "
             f"median of {args.rounds} interleaved rounds; bf16 dense: {bf16:.2f} tok/s.",
             "Perplexity: the evaluation windows (24 of 512 tokens). Reference: llm-compressor 0.14.0.1, same protocol.",
             "", "| method | ppl | vs dense | reference ppl | compress s | reference s | peak MB | size MB | "
             "decode tok/s | vs bf16 | load avg during compress |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref_ppl, ref_s = REFERENCE.get(r["method"], (None, None))
        change = f"{(r['ppl'] / dense_ppl - 1) * 100:+.1f}%" if dense_ppl and r["method"] != "dense" else "-"
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {change} | {ref_ppl or '-'} | {r['compress_s']} | "
                     f"{ref_s or '-'} | {r['peak_mem_mb'] or '-'} | {r['size_mb']} | {r['decode_tps']} | "
                     f"{r['decode_ratio_bf16']} | {'-' if not r.get('load_avg') else ' -> '.join(map(str, r['load_avg']))} |")
    (out / "prune_quant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
