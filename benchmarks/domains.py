"""Quality outside the calibration domain, SmolLM2-135M: the default recipe's perplexity change on
every evaluation set, and the share of the compression gap that distillation closes on each.

    python benchmarks/domains.py [--variant default|corpus|generated|mixed] [--method tsld|kl] [--steps N] [--lr X] [--tau T]
                                 [--seed S] [--rounds 5]

The stages are params.yaml's (default: Wanda 10% -> GPTQ w4 g64, mixed -> TSLD 180 steps), run with the
library's `run_stage` into `--work` (outputs named by their settings, reused when present). The
sets: the prepared eval split (in-domain: Python's documentation, which the recipe calibrates
and distils on) and every `evaluation.sets` entry of params.yaml (out of domain). The variants
change only what the distillation stage trains on:
- default: the stage's own `train_splits` (the default recipe's: text the teacher generates);
- corpus: train + calib windows of the calibration corpus;
- generated: text the teacher samples itself from its begin-of-sequence token (no domain), as
  many sequences as the default trains on windows, `--gen-len` tokens each;
- mixed: half of each.
`--method kl` trains the same steps with plain KL instead of the recipe's loss (same data, same
settings otherwise), to compare the losses at equal steps. `--seed` reseeds the distillation only
(the text the teacher generates for it and the batch order; the stages before it are shared), so
runs of both losses at several seeds give the spread one seed moves: the second table takes the
median per set over the seeds of each setting and pairs TSLD with KL seed by seed. `--rounds 0` skips the decode race.
Measured: perplexity of the base model, of the prune+quantize output (before distillation) and
of the final output on every set; gap closed = (before - after) / (before - base); size on
disk; decode tokens/s of base fp32, base bf16, final fp32 and final bf16, HF generate, 64 new
tokens, batch 1, greedy, interleaved rounds, medians (the final model at its faster dtype).
Writes domains.json (one entry per variant and settings, kept across runs) and domains.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.paired import mean_and_p  # noqa: E402
from frugalflow.config import KLDistill, TSLDDistill  # noqa: E402
from frugalflow.data import load_windows  # noqa: E402
from frugalflow.distill.losses import TOKEN_SCORES  # noqa: E402
from frugalflow.evaluate.perplexity import perplexity  # noqa: E402
from frugalflow.evaluate.sets import every_set  # noqa: E402
from frugalflow.evaluate.speed import interleaved_decode_tps  # noqa: E402
from frugalflow.models import load_model, load_tokenizer, weights_size_mb  # noqa: E402
from frugalflow.recipe_io import load_recipe  # noqa: E402
from frugalflow.stages import run_stage  # noqa: E402
from frugalflow.teacher_text import generated_windows  # noqa: E402

STAGE_BY_METHOD = {"tsld": TSLDDistill, "kl": KLDistill}
TSLD_ONLY = ("method", *sorted(set(TSLDDistill.model_fields) - set(KLDistill.model_fields)))  # tau, scale_by


def key_of(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def distill_data(variant: str, data: Path, teacher: Path, work: Path, splits: list[str], gen_len: int,
                 seed: int) -> tuple[Path, list[str], str]:
    """(data folder, splits to train on, description) for the variant's distillation."""
    if variant == "default":
        return data, splits, "the stage's train_splits: " + ", ".join(splits)
    real = torch.cat([load_windows(data, s) for s in ("train", "calib")])
    if variant == "corpus":
        return data, ["train", "calib"], f"train + calib windows of the calibration corpus ({len(real)} x 512 tokens)"
    n_gen = len(real) if variant == "generated" else len(real) // 2
    folder = work / f"data_{variant}_{key_of(n_gen, gen_len, seed)}"
    if not (folder / "train.safetensors").is_file():
        gen = generated_windows(teacher, n_gen, gen_len, seed)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "eval.safetensors", folder / "eval.safetensors")
        shutil.copy(data / "manifest.json", folder / "manifest.json")
        save_file({"windows": gen.contiguous()}, str(folder / "train.safetensors"))
        if variant == "mixed":
            g = torch.Generator().manual_seed(seed)
            pick = real[torch.randperm(len(real), generator=g)[: len(real) - n_gen]]
            save_file({"windows": pick[:, :gen_len].contiguous()}, str(folder / "calib.safetensors"))
    if variant == "generated":
        return folder, ["train"], f"{n_gen} teacher-generated sequences of {gen_len} tokens (no domain)"
    return folder, ["train", "calib"], (f"{n_gen} teacher-generated sequences + {len(real) - n_gen} calibration-"
                                        f"corpus windows, {gen_len} tokens each")


def recipe_and_folders(params: str, work: str) -> tuple:
    """The recipe at `params`, its base model and data folders, and `work` (created)."""
    recipe = load_recipe(params)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    return recipe, ROOT / recipe.base_model.path, ROOT / recipe.data.path, work


def before_distillation(compress: list, base: Path, data: Path, work: Path, seed: int) -> tuple[Path, dict]:
    """The output of the stages before distillation, run into `work` under names made of their
    settings and input (reused when present), and the seconds of those that ran."""
    current, seconds = base, {}
    for i, stage in enumerate(compress):
        out = work / f"{i}-{stage.method}-{key_of(stage.model_dump(mode='json'), current.name)}"
        if not (out / "config.json").is_file():
            t = time.perf_counter()
            run_stage(stage, current, out, data_dir=data, teacher_dir=base, seed=seed,
                      pruned=any(s.kind == "prune" for s in compress[:i]))
            seconds[stage.method] = round(time.perf_counter() - t, 1)
            print(f"{stage.method}: {seconds[stage.method]} s -> {out.name}", flush=True)
        current = out
    return current, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--variant", choices=("default", "corpus", "generated", "mixed"), default="default")
    parser.add_argument("--method", choices=("tsld", "kl"), help="distillation loss (default: the recipe's)")
    parser.add_argument("--steps", type=int, help="distillation steps (default: the recipe's)")
    parser.add_argument("--lr", type=float, help="distillation learning rate (default: the recipe's)")
    parser.add_argument("--tau", type=float, help="TSLD's token-scale temperature (default: the recipe's)")
    parser.add_argument("--scale-by", choices=TOKEN_SCORES,
                        help="TSLD's token score: the teacher's cross-entropy on the text or its entropy "
                             "(default: the recipe's)")
    parser.add_argument("--ce-weight", type=float, help="weight of the cross-entropy on the training text, beside "
                                                        "either loss (default: the recipe's)")
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--seed", type=int, help="the distillation's seed (default: the recipe's)")
    parser.add_argument("--rounds", type=int, default=5, help="decode race rounds (0: no race)")
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "bench-domains"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    recipe, base, data, work = recipe_and_folders(args.params, args.work)
    started = time.time()
    *compress, last = recipe.stages
    if last.kind != "distill":
        raise SystemExit(f"{args.params}: the last stage is {last.method}, not a distillation stage")
    last = last.model_copy(update={k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("tau", args.tau),
                                                     ("scale_by", args.scale_by), ("ce_weight", args.ce_weight))
                                   if v is not None})
    if args.method and args.method != last.method:  # the same settings under the other loss
        other = STAGE_BY_METHOD[args.method]
        last = other(**{k: v for k, v in last.model_dump().items() if k in other.model_fields}
                     | {"method": args.method})

    before, seconds = before_distillation(compress, base, data, work, recipe.seed)
    seed = recipe.seed if args.seed is None else args.seed
    ddata, splits, described = distill_data(args.variant, data, base, work, list(last.train_splits), args.gen_len,
                                            seed)
    last = last.model_copy(update={"train_splits": splits})
    key = key_of(last.model_dump(mode="json"), before.name, ddata.name, *([seed] if seed != recipe.seed else []))
    final = work / f"{len(compress)}-{last.method}-{args.variant}-{key}"
    if not (final / "config.json").is_file():
        t = time.perf_counter()
        run_stage(last, before, final, data_dir=ddata, teacher_dir=base, seed=seed, pruned=True,
                  report=lambda msg, m: print(msg, flush=True) if "step" not in m or m["step"] % 20 == 0 else None)
        seconds[last.method] = round(time.perf_counter() - t, 1)

    tokenizer = load_tokenizer(base)
    sets = every_set(recipe.evaluation.sets, data, tokenizer, ROOT)
    ppl: dict[str, dict[str, float]] = {}
    for label, folder in (("base", base), ("before", before), ("after", final)):
        model = load_model(folder)
        ppl[label] = {name: perplexity(model, w) for name, w in sets.items()}
        print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl[label].items()), flush=True)
        del model
    tps, fastest = {}, None
    if args.rounds > 0:
        models = {"base_fp32": load_model(base), "base_bf16": load_model(base, dtype=torch.bfloat16),
                  "final_fp32": load_model(final), "final_bf16": load_model(final, dtype=torch.bfloat16)}
        tps = interleaved_decode_tps(models, tokenizer, recipe.evaluation.prompt, args.rounds,
                                     new_tokens=recipe.evaluation.decode_tokens)
        fastest = max(("final_fp32", "final_bf16"), key=tps.get)
    per_set = {}
    for name in sets:
        b, x, y = ppl["base"][name], ppl["before"][name], ppl["after"][name]
        per_set[name] = {"windows": len(sets[name]), "base_ppl": round(b, 3), "before_ppl": round(x, 3),
                         "after_ppl": round(y, 3), "change_pct": round((y / b - 1) * 100, 2),
                         "before_change_pct": round((x / b - 1) * 100, 2),
                         "gap_closed_pct": round((x - y) / (x - b) * 100, 1) if x != b else None}
    entry = {
        "variant": args.variant, "date": time.strftime("%Y-%m-%d %H:%M"),
        "stages": " -> ".join(s.method for s in recipe.stages), "quantization": quantization(compress),
        "distill": last.model_dump(mode="json"), "seed": seed,
        "distill_data": described, "model": final.name, "sets": per_set,
        "worst_set": max(per_set, key=lambda k: per_set[k]["change_pct"]),
        "size_ratio_vs_fp32": round(weights_size_mb(final) / weights_size_mb(base), 3),
        "decode_tps": {k: round(v, 2) for k, v in tps.items()}, "fastest": fastest,
        "decode_vs_fp32": round(tps[fastest] / tps["base_fp32"], 3) if tps else None,
        "decode_vs_bf16": round(tps[fastest] / tps["base_bf16"], 3) if tps else None, "rounds": args.rounds,
        "stage_seconds": seconds, "wall_minutes": round((time.time() - started) / 60, 1),
        "machine": describe(),
        "load_average": round(os.getloadavg()[0], 1),
    }
    entry["all_within_10pct"] = all(s["change_pct"] <= 10.0 for s in per_set.values())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "domains.json"
    entries = json.loads(store.read_text()) if store.is_file() else []
    entries = [e for e in entries if e["model"] != entry["model"]] + [entry]
    store.write_text(json.dumps(entries, indent=1) + "\n")
    (out / "domains.md").write_text(markdown(entries))
    print(json.dumps(entry, indent=1))


def quantization(stages) -> str:
    """The quantization stage's grid in a few words, e.g. 'w4 g64 asym, 40% 8-bit sym, head int8'."""
    q = next((s for s in stages if s.kind == "quantize"), None)
    if q is None or not hasattr(q, "bits"):
        return q.method if q is not None else "none"
    text = f"w{q.bits} g{q.group_size} {'sym' if q.symmetric else 'asym'}"
    if getattr(q, "scale_format", "float16") != "float16":
        text += f" {q.scale_format} scales"
    mixed = getattr(q, "mixed", None)
    if mixed is not None:
        symmetric = (mixed.bits == 8 or q.symmetric) if mixed.symmetric is None else mixed.symmetric
        text += f", {mixed.share:.0%} {mixed.bits}-bit {'sym' if symmetric else 'asym'}"
    return text + (f", head int{q.head_bits}" if getattr(q, "head_bits", None) else ", head fp16")


def markdown(entries: list[dict]) -> str:
    names = list(entries[-1]["sets"])
    lines = ["# Perplexity per domain, SmolLM2-135M-Instruct: the default recipe and distillation-data variants",
             "",
             "Produced by `python benchmarks/domains.py --variant V`. Sets: `eval` is the prepared evaluation split "
             "of the calibration corpus (Python's documentation, in domain); the others are params.yaml's "
             "`evaluation.sets` (evals/domains/, out of domain; no stage calibrates or trains on them). Change: "
             "final vs fp32 base perplexity (fp32 activations). Gap closed: (before distillation - after) / "
             "(before - base). Decode: HF generate, 64 new tokens, batch 1, greedy, median of the interleaved "
             "rounds, the final model at its faster dtype, against base fp32 and base bf16 in the same rounds. "
             "Targets (issue 16): every set <= +10%, size <= 0.25 of fp32, decode >= 2x fp32 and >= 1.5x bf16.",
             "",
             "| variant | quantization | distillation (steps, lr; data) | "
             + " | ".join(f"{n} change % (before distill)" for n in names)
             + " | " + " | ".join(f"{n} gap closed %" for n in names)
             + " | size vs fp32 | decode vs fp32 / bf16 | machine, load, date |",
             "|" + "---|" * (3 + 2 * len(names) + 3)]
    for e in entries:
        d = e["distill"]
        cells = [e["variant"], e["quantization"], f"{d['method']} {d['steps']} steps, lr {d['lr']:g}"
                 + loss_settings(d) + (f", seed {e['seed']}" if e.get("seed") else "") + f"; {e['distill_data']}"]
        cells += [f"{e['sets'][n]['change_pct']:+.2f} ({e['sets'][n]['before_change_pct']:+.2f})" if n in e["sets"]
                  else "-" for n in names]
        cells += [f"{e['sets'][n]['gap_closed_pct']}" if n in e["sets"] else "-" for n in names]
        cells += [f"{e['size_ratio_vs_fp32']}", f"{e['decode_vs_fp32']}x / {e['decode_vs_bf16']}x ({e['fastest']})"
                  if e.get("fastest") else "- (no race)", f"{e['machine']}, load {e['load_average']}, {e['date']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Absolute perplexities (base / before / after) and decode tokens/s are in domains.json.", ""]
    return "\n".join(lines + seed_summary(entries, names)) + "\n"


def loss_settings(d: dict) -> str:
    """', tau T' for a TSLD run, its token score when it is not the paper's (older runs lack the key),
    and the cross-entropy term's weight when there is one."""
    text = ""
    if d["method"] == "tsld":
        text = f", tau {d['tau']:g}" + (f", scored by {d['scale_by']}" if d.get("scale_by", "target") != "target"
                                        else "")
    return text + (f", + {d['ce_weight']:g} x cross-entropy" if d.get("ce_weight") else "")


def seed_summary(entries: list[dict], names: list[str]) -> list[str]:
    """Per setting run at more than one distillation seed: the median change and gap closed per set;
    for TSLD, also against KL seed by seed (the runs that differ only in the loss and TSLD_ONLY, from the
    same model before distillation): the median difference, the seeds where TSLD is at least as good, and
    the mean difference with its interval and paired sign-flip p-value."""
    def setting(e: dict, loss: bool = True) -> tuple:
        d = {k: v for k, v in e["distill"].items() if loss or k not in TSLD_ONLY}
        if loss and d["method"] == "tsld":
            d.setdefault("scale_by", "target")  # runs from before the option
        before = tuple(e["sets"][n]["before_ppl"] for n in names if n in e["sets"])  # the same stages before
        return e["variant"], e["quantization"], json.dumps(d, sort_keys=True), e["machine"], before
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        groups.setdefault(setting(e), []).append(e)
    kl = {(setting(e, loss=False), e.get("seed", 0)): e for e in entries if e["distill"]["method"] == "kl"}
    rows = [runs for runs in groups.values() if len({r.get("seed", 0) for r in runs}) > 1]
    if not rows:
        return []
    lines = ["## Over distillation seeds (same stages before it)", "",
             "Medians per set over the seeds of each setting. TSLD vs KL: TSLD's change minus KL's at the same "
             "seed, in percentage points (negative: TSLD better), median and per seed, the seeds where "
             "TSLD's perplexity is at most KL's, and the mean difference with, in brackets, its 90% interval "
             "and the two-sided p-value of an exact paired sign-flip test (benchmarks/paired.py; the smallest "
             "p n seeds can give is 2 / 2^n, so the interval needs 5 seeds or more).",
             "",
             "| variant | distillation | seeds | " + " | ".join(f"{n} change % (median)" for n in names)
             + " | " + " | ".join(f"{n} gap closed % (median)" for n in names)
             + " | " + " | ".join(f"{n} TSLD vs KL" for n in names) + " | machine |",
             "|" + "---|" * (4 + 3 * len(names))]
    for runs in rows:
        runs = sorted(runs, key=lambda r: r.get("seed", 0))
        d = runs[0]["distill"]
        cells = [runs[0]["variant"], f"{d['method']} {d['steps']} steps, lr {d['lr']:g}" + loss_settings(d),
                 ", ".join(str(r.get("seed", 0)) for r in runs)]
        cells += [f"{statistics.median(r['sets'][n]['change_pct'] for r in runs):+.2f}" for n in names]
        cells += [f"{statistics.median(r['sets'][n]['gap_closed_pct'] for r in runs):.1f}" for n in names]
        pairs = [(r, kl[key]) for r in runs
                 if d["method"] == "tsld" and (key := (setting(r, loss=False), r.get("seed", 0))) in kl]
        for n in names:
            diffs = [t["sets"][n]["change_pct"] - k["sets"][n]["change_pct"] for t, k in pairs]
            wins = sum(t["sets"][n]["after_ppl"] <= k["sets"][n]["after_ppl"] for t, k in pairs)
            cells.append(f"{statistics.median(diffs):+.2f} ({' '.join(f'{x:+.2f}' for x in diffs)}); "
                         f"{wins} of {len(pairs)}; {mean_and_p(diffs)}" if pairs else "-")
        lines.append("| " + " | ".join(cells + [runs[0]["machine"]]) + " |")
    return lines + [""]


if __name__ == "__main__":
    main()
