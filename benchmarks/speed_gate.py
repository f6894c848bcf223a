"""The figure behind `gates.min_decode_speedup` in params.yaml: the nightly flow's own decode race, repeated.

    python benchmarks/speed_gate.py [--candidate MODEL_DIR] [--races 3] [--rounds 3] [--threads N]

The flow races each candidate against the base model in its evaluation (frugalflow/evaluate/race.py:
`evaluation.decode_race_rounds` interleaved rounds, medians; the gate reads their ratio,
`decode_speedup`). This script runs that race `--races` times, each of `--rounds` rounds (the default
recipe's 3), on the base model (fp32), the default recipe's packed candidate and the same candidate
with its linears dequantized to dense fp32 (what a candidate decodes at when its packed kernels are
lost: the same weights, no speed-up; a real slowdown the gate must catch). Every model decodes once per
round, in turn. The candidate by default is the default recipe's quantized model that
benchmarks/languages.py left (`calib-mix-share60`: wanda 0.1 -> gptq w4 g64, 60% 8-bit, head int8,
before distillation; distillation keeps the grid, so the final model has the same kernels).
Adds the run to speed_gate.json and rewrites speed_gate.md from all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from frugalflow.evaluate.speed import decode_speed  # noqa: E402
from frugalflow.models import load_model, load_tokenizer  # noqa: E402
from frugalflow.quant.pack import dequantize_model  # noqa: E402
from frugalflow.recipe_io import load_recipe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CANDIDATE = ROOT / "artifacts" / "bench-languages" / "data-ccd29e17" / "1-gptq-2fdf115c"


def race(models: dict, tokenizer, prompt: str, rounds: int, new_tokens: int) -> dict[str, list[float]]:
    """Each model's decode tokens/s per round, every model once per round (as speed.interleaved_decode_tps)."""
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            speeds[name].append(decode_speed(model, tokenizer, prompt, new_tokens=new_tokens, repeats=1)["decode_tps"])
    return speeds


def markdown(runs: list[dict]) -> str:
    lines = ["# The speed gate's threshold: the flow's decode race, repeated",
             "",
             "Produced by `python benchmarks/speed_gate.py`, one section per run, newest first. Each race is what "
             "the nightly flow measures for a candidate (`evaluation.decode_race_rounds` interleaved rounds, "
             "medians; HF generate, batch 1, greedy, fp32 activations): `decode_speedup` = candidate tokens/s over "
             "the base model's. `dequantized` is the same candidate with dense fp32 linears (the same weights "
             "without the packed kernels): a slowdown the gate must catch.", "",
             "## Why 1.3", "",
             "On a quiet host the default recipe's packed model decodes 1.80x the fp32 base in this race (AMD EPYC "
             "without AVX-512, load 2.0, 5 rounds, `languages.md`: 17.21 against 9.54 tokens/s), the packed model at "
             "bf16 1.60x to 2.67x (`decode_split.md`, two hosts), and the recipe before the languages 3.40x on an EPYC "
             "with AVX-512 (README, `make demo`). A candidate whose linears decode dense runs at about the base model's "
             "speed (0.92x for these weights dense in the one-thread race below). 1.3 passes the slowest quiet "
             "figure with a margin of 1.38x and fails a candidate that lost its packed kernels or gained nothing. "
             "`tests/test_speed_gate.py` checks the default recipe against the 1.80x race.",
             "",
             "Not on a host whose CPUs other processes oversubscribe: there the race measures the contention, not the "
             "model. With other sessions' test suites on the same 2 cores (load 4 to 5) the run of 2026-12-08 00:07 "
             "below put the packed model at 0.30x and 0.68x of the base with torch's 2 threads (a first run at load 7, "
             "stopped after one race, not recorded: 0.22x), slower than the same weights dense; likely its ~120 small "
             "kernel calls per token, each waiting for a descheduled second thread. A night there fails the speed gate "
             "(verdict `decode_speedup ... fails >= 1.3`, a `gates_failed` message) and registers nothing: run nights "
             "on a host of their own, or turn the gate off for shared ones (`-s gates.min_decode_speedup=null`). With "
             "1 torch thread under the same load one race gave 1.44x packed and 0.92x dense (the 00:33 run): a "
             "one-thread race may separate them where two threads do not; not measured on a quiet host, so the flow's "
             "race keeps torch's threads.",
             ""]
    for run in reversed(runs):
        lines += [f"## {run['date']}: {run['machine']}, load {run['load']}", "",
                  f"Candidate `{run['candidate']}`, {run['races']} races of {run['rounds']} rounds, "
                  f"{run['new_tokens']} new tokens, {run.get('minutes', '?')} min. Threshold in params.yaml: "
                  f"{run['threshold']}.", "",
                  "| race | base tok/s | candidate tok/s | dequantized tok/s | candidate speedup | dequantized speedup |",
                  "|---|---|---|---|---|---|"]
        for i, r in enumerate(run["per_race"], 1):
            lines.append(f"| {i} | {r['base']:.2f} | {r['candidate']:.2f} | {r['dequantized']:.2f} | "
                         f"{r['candidate_speedup']:.3f} | {r['dequantized_speedup']:.3f} |")
        s = run["summary"]
        threshold = run["threshold"]
        verdicts = ", ".join("pass" if r["candidate_speedup"] >= threshold else "FAIL" for r in run["per_race"])
        lines += ["", f"Candidate speedup: min {s['candidate_min']:.3f}, median {s['candidate_median']:.3f} (gate at "
                      f"{threshold}: {verdicts}); dequantized: max {s['dequantized_max']:.3f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", type=Path, default=DEFAULT_CANDIDATE)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--races", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None, help="per race; default: the recipe's decode_race_rounds")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens; default: the recipe's decode_tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's (the flow's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = round(os.getloadavg()[0], 1)
    recipe = load_recipe(args.params)
    rounds = args.rounds or recipe.evaluation.decode_race_rounds
    base_dir = ROOT / recipe.base_model.path
    models = {"base": load_model(base_dir), "candidate": load_model(args.candidate),
              "dequantized": dequantize_model(load_model(args.candidate))}
    tokenizer = load_tokenizer(base_dir)
    started = datetime.now()
    tokens = args.tokens or recipe.evaluation.decode_tokens
    per_race = []
    for i in range(args.races):
        speeds = race(models, tokenizer, recipe.evaluation.prompt, rounds, tokens)
        med = {name: statistics.median(v) for name, v in speeds.items()}
        per_race.append({**med, "candidate_speedup": med["candidate"] / med["base"],
                         "dequantized_speedup": med["dequantized"] / med["base"], "rounds": speeds})
        print(f"race {i + 1}/{args.races}: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
              + f"; speedup {per_race[-1]['candidate_speedup']:.3f}, dequantized {per_race[-1]['dequantized_speedup']:.3f}",
              flush=True)
    cand = [r["candidate_speedup"] for r in per_race]
    deq = [r["dequantized_speedup"] for r in per_race]
    run = {"date": started.strftime("%Y-%m-%d %H:%M"), "machine": describe(),
           "load": f"{load_before} before, {os.getloadavg()[0]:.1f} after",
           "minutes": round((datetime.now() - started).total_seconds() / 60, 1),
           "candidate": str(args.candidate.relative_to(ROOT) if args.candidate.is_relative_to(ROOT) else args.candidate),
           "races": args.races, "rounds": rounds, "new_tokens": tokens,
           "threshold": recipe.gates.min_decode_speedup, "per_race": per_race,
           "summary": {"candidate_min": min(cand), "candidate_median": statistics.median(cand),
                       "dequantized_max": max(deq)}}
    path = RESULTS / "speed_gate.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append(run)
    path.write_text(json.dumps(runs, indent=1) + "\n")
    (RESULTS / "speed_gate.md").write_text(markdown(runs))
    print(markdown([run]))


if __name__ == "__main__":
    main()
