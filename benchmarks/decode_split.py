"""Where a decoded token's time goes, SmolLM2-135M: the packed model against the fp32 base.

    python benchmarks/decode_split.py MODEL_DIR [--rounds 5]

Per-token decode time (HF generate, 64 new tokens, batch 1, greedy, interleaved rounds, medians)
of the base at fp32 and of MODEL_DIR (a packed model) at bf16, each also with every linear
replaced by one that returns zeros (what is left is everything but the linears: HF's per-layer
Python, norms, rotary, KV cache, attention, sampling), and MODEL_DIR with its sibling linears
unlinked (quant/fused.py off). Then the weight bandwidth of torch's CPU kernels at one row on a
1536 x 576 layer, cache-cold (120 distinct weights in turn): int8 and int4 packed, fp32 and bf16
dense. Adds the run to decode_split.json and rewrites decode_split.md from all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from frugalflow.models import load_model, load_tokenizer  # noqa: E402
from frugalflow.quant.pack import INT4_MM_CPU, INT8_MM, QuantLinear  # noqa: E402
from frugalflow.recipe_io import load_recipe  # noqa: E402

NEW_TOKENS = 64


def zero_linears(model: nn.Module) -> nn.Module:
    def zeros(self, x):
        return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype)
    for m in model.modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            if isinstance(m, QuantLinear):
                m.siblings = None
            m.forward = types.MethodType(zeros, m)
    return model


def unlinked(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.siblings = None
    return model


def ms_per_token(model: nn.Module, ids: torch.Tensor, pad: int) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
        return (time.perf_counter() - t) / NEW_TOKENS * 1e3


def kernel_bandwidth(copies: int = 120, n: int = 1536, k: int = 576) -> dict[str, float]:
    """GB/s of weight read per kernel at one row, each call on a different weight (cache-cold)."""
    torch.manual_seed(0)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    w8 = [torch.randint(-128, 127, (n, k), dtype=torch.int8) for _ in range(copies)]
    s8 = torch.rand(n, dtype=torch.bfloat16)
    w4 = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
          for _ in range(copies)]
    sz = torch.rand(k // 64, n, 2, dtype=torch.bfloat16)
    wf = [torch.randn(n, k) for _ in range(copies // 4)]
    wb = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(copies // 2)]
    cases = {"int8 packed": (lambda w: INT8_MM(x, w, s8), w8, 1.0), "int4 packed": (lambda w: INT4_MM_CPU(x, w, 64, sz), w4, 0.5),
             "fp32 dense": (lambda w: nn.functional.linear(x.float(), w), wf, 4.0),
             "bf16 dense": (lambda w: nn.functional.linear(x, w), wb, 2.0)}
    out = {}
    for name, (call, weights, bytes_per_weight) in cases.items():
        for w in weights[:10]:
            call(w)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            for w in weights:
                call(w)
            times.append((time.perf_counter() - t) / len(weights))
        out[name] = round(n * k * bytes_per_weight / statistics.median(times) / 1e9, 1)
    return out


def section(run: dict) -> list[str]:
    """One run's table, the linears' share and the kernels' bandwidth, as markdown lines."""
    lines = [f"## {run['date']}: {run['machine']}, load {run['load_average']}", "",
             f"Model {run['model']}, {run['rounds']} rounds.", "", "| model | ms per token | vs base fp32 |",
             "|---|---|---|"]
    lines += [f"| {k} | {v} | {run['speedup_vs_base_fp32'].get(k, '')} |" for k, v in run["ms_per_token"].items()]
    return lines + ["", f"Linears: {run['linears_ms']['base fp32']} ms per token in the base, "
                    f"{run['linears_ms']['packed bf16']} ms in the packed model; the rest is what the zeroed rows take.",
                    "", "Kernel weight bandwidth at one row, 1536 x 576, cache-cold (GB/s): "
                    + ", ".join(f"{k} {v}" for k, v in run["kernel_GBps_1536x576_cold"].items()), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a packed model folder (e.g. a flow's or domains.py's final model)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    recipe = load_recipe(args.params)
    base, final = ROOT / recipe.base_model.path, Path(args.model)
    tokenizer = load_tokenizer(base)
    ids = tokenizer(recipe.evaluation.prompt, return_tensors="pt").input_ids
    models = {"base fp32": load_model(base), "base fp32, linears zeroed": zero_linears(load_model(base)),
              "packed bf16": load_model(final, dtype=torch.bfloat16),
              "packed bf16, siblings unlinked": unlinked(load_model(final, dtype=torch.bfloat16)),
              "packed bf16, linears zeroed": zero_linears(load_model(final, dtype=torch.bfloat16))}
    times: dict[str, list[float]] = {k: [] for k in models}
    for name, model in models.items():  # warm up: kernels' packed copies, first-call costs
        ms_per_token(model, ids, tokenizer.eos_token_id)
    for r in range(args.rounds):
        for name, model in models.items():
            times[name].append(ms_per_token(model, ids, tokenizer.eos_token_id))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in times.items()), flush=True)
    ms = {k: round(statistics.median(v), 2) for k, v in times.items()}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "model": final.name, "rounds": args.rounds,
        "machine": describe(), "load_average": round(os.getloadavg()[0], 1),
        "ms_per_token": ms,
        "linears_ms": {"base fp32": round(ms["base fp32"] - ms["base fp32, linears zeroed"], 2),
                       "packed bf16": round(ms["packed bf16"] - ms["packed bf16, linears zeroed"], 2)},
        "speedup_vs_base_fp32": {k: round(ms["base fp32"] / v, 3) for k, v in ms.items() if "zeroed" not in k},
        "kernel_GBps_1536x576_cold": kernel_bandwidth(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "decode_split.json"
    runs = json.loads(record.read_text()) if record.exists() else []
    runs = ([runs] if isinstance(runs, dict) else runs) + [result]  # one run per entry, machines differ
    record.write_text(json.dumps(runs, indent=1) + "\n")
    lines = ["# Where a decoded token's time goes: packed SmolLM2-135M vs the fp32 base", "",
             "Produced by `python benchmarks/decode_split.py`, one section per run, newest first. HF generate, "
             f"{NEW_TOKENS} new tokens, batch 1, greedy, medians of interleaved rounds (prefill included, spread "
             "over the tokens).", ""]
    for run in reversed(runs):
        lines += section(run)
    (out / "decode_split.md").write_text("\n".join(lines))
    print("\n".join(section(result)))


if __name__ == "__main__":
    main()
