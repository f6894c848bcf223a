"""4-bit quantization outside the calibration domain, SmolLM2-135M: perplexity change per evaluation
set for RTN, GPTQ at two dampenings, GPTQ calibrated on teacher-generated text, and GPTQ with the
most sensitive layers at 8 bits, all on the same Wanda-10% model, before any distillation.

    python benchmarks/quant_domains.py [--windows 8] [--variants rtn,gptq,...]

Sets: the prepared eval split (in domain: Python's documentation, which every variant but
`gptq_generated` calibrates on) and params.yaml's `evaluation.sets` (out of domain), the first
`--windows` windows of each. Writes quant_domains.json and quant_domains.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from frugalflow.arch import compressible_linears  # noqa: E402
from frugalflow.config import GPTQQuant, WandaPrune  # noqa: E402
from frugalflow.data import load_windows  # noqa: E402
from frugalflow.evaluate.perplexity import perplexity  # noqa: E402
from frugalflow.evaluate.sets import every_set  # noqa: E402
from frugalflow.models import load_model, load_tokenizer  # noqa: E402
from frugalflow.quant.gptq import gptq_quantize, mixed_layers  # noqa: E402
from frugalflow.quant.rtn import rtn_linears  # noqa: E402
from frugalflow.recipe_io import load_recipe  # noqa: E402
from frugalflow.stages import run_stage  # noqa: E402
from frugalflow.teacher_text import generated_windows  # noqa: E402

W4 = {"method": "gptq", "bits": 4, "group_size": 64, "act_order": True}
VARIANTS = {  # name: (stage settings, calibration text)
    "rtn": ({"method": "rtn", "bits": 4, "group_size": 64}, "none"),
    "gptq": ({**W4, "dampening": 0.01}, "corpus"),
    "gptq_damp0.1": ({**W4, "dampening": 0.1}, "corpus"),
    "gptq_generated": ({**W4, "dampening": 0.01}, "generated"),
    "gptq_damp0.1_mixed0.4": ({**W4, "dampening": 0.1, "mixed": {"share": 0.4}}, "corpus"),
}


def quantize(model, settings: dict, calib: torch.Tensor) -> None:
    """The variant's 4-bit weights written back into `model` (computed as packed; not packed here)."""
    if settings["method"] == "rtn":
        rtn_linears(compressible_linears(model), 4, 64, False, write_back=True)
        return
    stage = GPTQQuant(**settings)
    grids = mixed_layers(model, calib, stage)[1] if stage.mixed is not None else {}
    gptq_quantize(model, calib, 4, 64, False, act_order=True, dampening=stage.dampening, layer_grids=grids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "bench-domains"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    recipe = load_recipe(ROOT / "params.yaml")
    base, data, work = ROOT / recipe.base_model.path, ROOT / recipe.data.path, Path(args.work)
    pruned = work / "wanda10"
    if not (pruned / "config.json").is_file():
        run_stage(WandaPrune(method="wanda", sparsity=0.1), base, pruned, data_dir=data, teacher_dir=base)
    tokenizer = load_tokenizer(base)
    sets = {name: w[:args.windows] for name, w in every_set(recipe.evaluation.sets, data, tokenizer, ROOT).items()}
    calib = load_windows(data, "calib")
    started = time.time()
    base_ppl = {n: perplexity(load_model(base), w) for n, w in sets.items()}
    rows = []
    for name in args.variants.split(","):
        settings, text = VARIANTS[name]
        model = load_model(pruned)
        windows = generated_windows(base, len(calib), calib.shape[1], recipe.seed) if text == "generated" else calib
        t = time.perf_counter()
        quantize(model, settings, windows)
        seconds = round(time.perf_counter() - t, 1)
        ppl = {n: perplexity(model, w) for n, w in sets.items()}
        change = {n: round((ppl[n] / base_ppl[n] - 1) * 100, 1) for n in sets}
        rows.append({"variant": name, "settings": settings, "calibration": text, "seconds": seconds,
                     "ppl": {n: round(v, 3) for n, v in ppl.items()}, "change_pct": change,
                     "worst_set": max(change, key=change.get)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "windows_per_set": args.windows,
              "base_ppl": {n: round(v, 3) for n, v in base_ppl.items()}, "rows": rows,
              "machine": describe(),
              "load_average": round(os.getloadavg()[0], 1), "wall_minutes": round((time.time() - started) / 60, 1)}
    out = Path(args.out)
    (out / "quant_domains.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "quant_domains.md").write_text(markdown(result))


def markdown(r: dict) -> str:
    names = list(r["base_ppl"])
    lines = ["# 4-bit quantization per domain, SmolLM2-135M-Instruct (Wanda 10% first, no distillation)", "",
             f"Machine: {r['machine']}, load average {r['load_average']}. Date: {r['date']}. "
             f"Produced by `python benchmarks/quant_domains.py`. Perplexity on the first {r['windows_per_set']} "
             "windows (512 tokens) of each set: `eval` in domain (Python's documentation, the calibration corpus), "
             "the others out of domain (evals/domains/). Calibration: 32 windows of the corpus, or as many "
             "sequences of 512 tokens the base model samples from its BOS token (`generated`). w4 g64 "
             "asymmetric, GPTQ with activation order.", "",
             "base perplexity: " + ", ".join(f"{n} {v}" for n, v in r["base_ppl"].items()), "",
             "| variant | calibration | " + " | ".join(f"{n} change %" for n in names) + " | worst | seconds |",
             "|" + "---|" * (len(names) + 4)]
    for row in r["rows"]:
        lines.append(f"| {row['variant']} | {row['calibration']} | "
                     + " | ".join(f"{row['change_pct'][n]:+.1f}" for n in names)
                     + f" | {row['worst_set']} | {row['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
