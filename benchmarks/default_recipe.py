"""The default recipe's output against the fp32 base model, side by side: size, perplexity, decode speed.

    python benchmarks/default_recipe.py [--model artifacts/stages/2-tsld-...] [--rounds 7]

Run `frugalflow run` first (the README's main command): the model measured is the final stage
output of that run (by default the newest finished `artifacts/stages/<last>-*` folder). The
targets of issue 4: at most a quarter of the fp32 size, at least 2x the fp32 decode speed,
perplexity at most 10% above dense. Decode: HF generate, 64 new tokens, batch 1, greedy, the
four models interleaved round by round, medians. Writes default_recipe.json and .md.
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
from frugalflow.data import load_windows  # noqa: E402
from frugalflow.evaluate.perplexity import perplexity  # noqa: E402
from frugalflow.evaluate.speed import interleaved_decode_tps  # noqa: E402
from frugalflow.models import load_model, load_tokenizer, weights_size_mb  # noqa: E402
from frugalflow.recipe_io import load_recipe  # noqa: E402


def newest_final_stage(artifacts: Path, n_stages: int, method: str) -> Path:
    done = [d for d in (artifacts / "stages").glob(f"{n_stages - 1}-{method}-*") if (d / "stats.json").is_file()]
    if not done:
        raise SystemExit(f"no finished {method} stage output under {artifacts / 'stages'}: run `frugalflow run` first")
    return max(done, key=lambda d: (d / "stats.json").stat().st_mtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--model", help="compressed model folder (default: newest final stage output)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    recipe = load_recipe(args.params)
    base = ROOT / recipe.base_model.path
    last = recipe.stages[-1]
    model_dir = Path(args.model) if args.model else newest_final_stage(ROOT / recipe.artifacts_dir, len(recipe.stages),
                                                                        last.method)
    print(f"base {base}\ncompressed {model_dir}", flush=True)
    windows = load_windows(ROOT / recipe.data.path, "eval")
    tokenizer = load_tokenizer(base)
    models = {"dense_fp32": load_model(base), "dense_bf16": load_model(base, dtype=torch.bfloat16),
              "compressed_fp32": load_model(model_dir), "compressed_bf16": load_model(model_dir, dtype=torch.bfloat16)}
    ppl = {}
    for name, model in models.items():
        ppl[name] = perplexity(model, windows)
        print(f"{name}: ppl {ppl[name]:.3f}", flush=True)
    tps = interleaved_decode_tps(models, tokenizer, recipe.evaluation.prompt, args.rounds,
                                 new_tokens=recipe.evaluation.decode_tokens)
    size = {"dense": weights_size_mb(base), "compressed": weights_size_mb(model_dir)}
    fastest = max(("compressed_fp32", "compressed_bf16"), key=tps.get)
    result = {
        "recipe": " -> ".join(s.method for s in recipe.stages), "model": model_dir.name, "rounds": args.rounds,
        "dense_ppl": round(ppl["dense_fp32"], 3),
        **{f"{name}_ppl": round(ppl[name], 3) for name in ("dense_bf16", "compressed_fp32", "compressed_bf16")},
        "ppl_increase_pct": round(100 * (ppl[fastest] / ppl["dense_fp32"] - 1), 2),
        "dense_size_mb": round(size["dense"], 1), "compressed_size_mb": round(size["compressed"], 1),
        "size_ratio_vs_fp32": round(size["compressed"] / size["dense"], 3),
        **{f"{name}_decode_tps": round(tps[name], 2) for name in models},
        "fastest": fastest,
        "decode_ratio_vs_fp32": round(tps[fastest] / tps["dense_fp32"], 3),
        "decode_ratio_vs_bf16": round(tps[fastest] / tps["dense_bf16"], 3),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_recipe.json").write_text(json.dumps(result, indent=1) + "\n")
    machine = f"{describe()}, load average {os.getloadavg()[0]:.1f}"
    lines = ["# Default recipe against fp32 dense, SmolLM2-135M-Instruct", "",
             f"Machine: {machine}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Recipe: params.yaml ({result['recipe']}), output {model_dir.name}. Perplexity on the "
             f"{len(windows)} evaluation windows; decode: {recipe.evaluation.decode_tokens} new tokens, batch 1, "
             f"greedy, median of {args.rounds} interleaved rounds. Targets: size <= 0.25 of fp32, decode >= 2x fp32, "
             f"ppl <= +10% (measured on the fastest compressed variant, `fastest`).", "",
             "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result.items()]
    (out / "default_recipe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
