"""Quality per language, SmolLM2-135M: which data the quality-deciding stages see, one variable at a time.

    python benchmarks/languages.py [--variants english,calib-mix,...] [--rounds 3] [--race VARIANT]

Each variant is params.yaml with a few keys set (VARIANTS below): the calibration windows (English
only, or with 4 windows each of French, German and Russian from corpora/, keeping 32 in all), the
text the teacher generates for distillation (from its begin-of-sequence token, or one prompt per
language in turn) and the share of decoder weights kept at 8 bits. Stages run with the library's
`run_stage` into `--work`, each data configuration prepared in its own folder and stage outputs
named by their settings and input (reused when present). Every variant is evaluated on every set
of params.yaml (the prepared eval split, English out-of-domain sets and the languages): change of
perplexity against the fp32 base, before and after distillation (quantized weights dequantized to
fp32 for speed: the same weights); size on disk against fp32. The
variant named by `--race` also gets the decode race (HF generate, 64 new tokens, batch 1, greedy,
median of interleaved rounds, against the base in the same rounds).
Writes languages.json (entries kept across runs, one per variant and model), languages.md and
languages.png (size against perplexity change per set: the frontier, each language a line).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.domains import before_distillation, key_of, quantization  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from frugalflow.config import fingerprint  # noqa: E402
from frugalflow.data import prepare_data  # noqa: E402
from frugalflow.evaluate.perplexity import perplexity  # noqa: E402
from frugalflow.evaluate.sets import every_set  # noqa: E402
from frugalflow.evaluate.speed import interleaved_decode_tps  # noqa: E402
from frugalflow.method import float_model  # noqa: E402
from frugalflow.models import load_model, load_tokenizer, weights_size_mb  # noqa: E402
from frugalflow.recipe_io import apply_override, read_yaml, recipe_from_dict  # noqa: E402
from frugalflow.stages import run_stage  # noqa: E402

LANGUAGES = ("french", "german", "russian")
MIX = {lang: {"text_files": [f"corpora/installation-guide/{lang}.txt"], "windows": 4} for lang in LANGUAGES}
PROMPTS = ["", "Voici un article en français. Il explique comment", "Dies ist ein Artikel auf Deutsch. Er erklärt, wie",
           "Это статья на русском языке. В ней объясняется, как"]
ENGLISH_CALIB = {"data.calib_windows": 32, "data.calib_mix": {}}
MIXED_CALIB = {"data.calib_windows": 20, "data.calib_mix": MIX}
PROMPTS_OFF = {"stages.2.generated_prompts": []}
PROMPTS_ON = {"stages.2.generated_prompts": PROMPTS}
VARIANTS = {  # name -> recipe keys set (distillation is stages.2, the quantization stages.1)
    "english": {**ENGLISH_CALIB, **PROMPTS_OFF, "stages.1.mixed.share": 0.4},
    "calib-mix": {**MIXED_CALIB, **PROMPTS_OFF, "stages.1.mixed.share": 0.4},
    "calib-mix-share60": {**MIXED_CALIB, **PROMPTS_OFF, "stages.1.mixed.share": 0.6},
    "calib-mix-share80": {**MIXED_CALIB, **PROMPTS_OFF, "stages.1.mixed.share": 0.8},
    "gen-prompts": {**ENGLISH_CALIB, **PROMPTS_ON, "stages.1.mixed.share": 0.4},
    "calib-mix-prompts": {**MIXED_CALIB, **PROMPTS_ON, "stages.1.mixed.share": 0.4},
    "calib-mix-share60-prompts": {**MIXED_CALIB, **PROMPTS_ON, "stages.1.mixed.share": 0.6},
    "calib-mix-share80-prompts": {**MIXED_CALIB, **PROMPTS_ON, "stages.1.mixed.share": 0.8},
}


def variant_recipe(params: Path, keys: dict):
    data = read_yaml(params)
    for key, value in keys.items():
        apply_override(data, key.split("."), copy.deepcopy(value))
    return recipe_from_dict(data, f"{params} + {sorted(keys)}")


def prepared(recipe, work: Path, base: Path) -> Path:
    """The recipe's data prepared in its own folder under `work` (once per data configuration)."""
    folder = work / f"data-{fingerprint(recipe.data)[:8]}"
    if not (folder / "manifest.json").is_file():
        cwd = os.getcwd()
        os.chdir(ROOT)  # calib_mix paths are relative to the project root
        try:
            prepare_data(recipe.data, base, folder)
        finally:
            os.chdir(cwd)
    return folder


def ppl_per_set(folder: Path, sets: dict, cache: Path) -> dict[str, float]:
    """Perplexity on every set, with quantized linears dequantized to fp32 (the same weights; on a
    CPU without AVX-512 the packed kernels take about 5x longer on 512-token windows)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    model = float_model(folder, "cpu")[0]
    out = {name: round(perplexity(model, w), 4) for name, w in sets.items()}
    cache.write_text(json.dumps(out))
    print(f"{folder.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()), flush=True)
    return out


def run_variant(name: str, params: Path, work: Path, rounds: int, distill: bool) -> dict:
    started = time.time()
    recipe = variant_recipe(params, VARIANTS[name])
    base = ROOT / recipe.base_model.path
    data = prepared(recipe, work, base)
    *compress, last = recipe.stages
    stage_work = work / data.name
    before, seconds = before_distillation(compress, base, data, stage_work, recipe.seed)
    final = stage_work / f"{len(compress)}-{last.method}-{key_of(last.model_dump(mode='json'), before.name)}"
    if not distill:
        final = before
    elif not (final / "config.json").is_file():
        t = time.perf_counter()
        run_stage(last, before, final, data_dir=data, teacher_dir=base, seed=recipe.seed, pruned=True,
                  report=lambda msg, m: print(msg, flush=True) if "step" not in m or m["step"] % 20 == 0 else None)
        seconds[last.method] = round(time.perf_counter() - t, 1)
    tokenizer = load_tokenizer(base)
    sets = every_set(recipe.evaluation.sets, data, tokenizer, ROOT)
    key = key_of(sorted(recipe.evaluation.sets))
    ppl = {label: ppl_per_set(folder, sets, work / f"ppl-{key_of(str(folder.relative_to(ROOT)), key)}.json")
           for label, folder in (("base", base), ("before", before), ("after", final))}
    per_set = {n: {"windows": len(sets[n]), "base_ppl": ppl["base"][n], "before_ppl": ppl["before"][n],
                   "after_ppl": ppl["after"][n], "change_pct": round((ppl["after"][n] / ppl["base"][n] - 1) * 100, 2),
                   "before_change_pct": round((ppl["before"][n] / ppl["base"][n] - 1) * 100, 2)} for n in sets}
    tps = {}
    if rounds > 0:
        models = {"base_fp32": load_model(base), "base_bf16": load_model(base, dtype=torch.bfloat16),
                  "final_fp32": load_model(final), "final_bf16": load_model(final, dtype=torch.bfloat16)}
        tps = interleaved_decode_tps(models, tokenizer, recipe.evaluation.prompt, rounds,
                                     new_tokens=recipe.evaluation.decode_tokens)
    fastest = max(("final_fp32", "final_bf16"), key=tps.get) if tps else None
    calib = json.loads((data / "manifest.json").read_text())["splits"]["calib"]
    return {
        "variant": name, "distilled": distill, "date": time.strftime("%Y-%m-%d %H:%M"), "keys": VARIANTS[name],
        "quantization": quantization(compress), "calibration": calib.get("sources") or {recipe.data.corpus: {
            "windows": calib["windows"]}},
        "distill_prompts": list(last.generated_prompts) if distill else None,
        "model": f"{data.name}/{final.name}", "sets": per_set,
        "worst_set": max(per_set, key=lambda k: per_set[k]["change_pct"]),
        "size_ratio_vs_fp32": round(weights_size_mb(final) / weights_size_mb(base), 3),
        "decode_tps": {k: round(v, 2) for k, v in tps.items()}, "fastest": fastest,
        "decode_vs_fp32": round(tps[fastest] / tps["base_fp32"], 3) if tps else None, "rounds": rounds,
        "stage_seconds": seconds, "wall_minutes": round((time.time() - started) / 60, 1),
        "machine": describe(), "load_average": round(os.getloadavg()[0], 1),
    }


def markdown(entries: list[dict], default: str | None) -> str:
    names = list(entries[-1]["sets"])
    lines = ["# Perplexity per language, SmolLM2-135M-Instruct: the data each stage sees", "",
             "Produced by `python benchmarks/languages.py`. Each variant is params.yaml with the keys in its row "
             "set, one variable at a time from `english` (the recipe before this benchmark). Sets: `eval` is the "
             "prepared split of the calibration corpus (Python's documentation); `fiction`, `legal` English out of "
             "domain; `french`, `german`, `russian` the Debian FAQ (evals/domains/), a different document from the "
             "calibration text in those languages (corpora/, the Debian installation guide). Change: after "
             "distillation vs the fp32 base (before distillation in brackets). Targets (issue 38): every set <= "
             "+10%, size <= 0.25 of fp32, decode >= 2x fp32." + (f" params.yaml now is `{default}`." if default
                                                                   else ""), "",
             "| variant | calibration windows | distillation text | quantization | "
             + " | ".join(f"{n} % (before)" for n in names) + " | worst | size vs fp32 | decode vs fp32 | "
             "minutes | machine, load, date |", "|" + "---|" * (4 + len(names) + 6)]
    for e in entries:
        calib = ", ".join(f"{k} {v['windows']}" for k, v in e["calibration"].items())
        text = "not distilled" if e["distill_prompts"] is None else "teacher from BOS" if not e["distill_prompts"] else (
            f"teacher, {len(e['distill_prompts'])} prompts in turn ({', '.join(repr(p[:12]) for p in e['distill_prompts'])})")
        cells = [f"**{e['variant']}**" if e["variant"] == default else e["variant"], calib, text, e["quantization"]]
        cells += [f"{e['sets'][n]['change_pct']:+.2f} ({e['sets'][n]['before_change_pct']:+.2f})" if e["distilled"]
                  else f"({e['sets'][n]['before_change_pct']:+.2f})" for n in names]
        cells += [f"{e['worst_set']} {e['sets'][e['worst_set']]['change_pct']:+.2f}", f"{e['size_ratio_vs_fp32']}",
                  f"{e['decode_vs_fp32']}x ({e['fastest']})" if e.get("fastest") else "- (no race)",
                  f"{e['wall_minutes']}", f"{e['machine']}, load {e['load_average']}, {e['date']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "Absolute perplexities and stage seconds are in languages.json; the frontier "
                                  "(size against change, each set a line) in languages.png.", ""])


def plot(entries: list[dict], path: Path, default: str | None) -> None:
    from frugalflow.plots import _figure, _save

    fig = _figure()
    ax = fig.add_subplot()
    colors = {}
    for distilled, style in ((False, ":"), (True, "-")):  # one line per set: before distillation dotted
        group = sorted((e for e in entries if e["distilled"] == distilled), key=lambda e: e["size_ratio_vs_fp32"])
        for name in entries[-1]["sets"]:
            if not group:
                continue
            line, = ax.plot([e["size_ratio_vs_fp32"] for e in group], [e["sets"][name]["change_pct"] for e in group],
                            marker="o", linestyle=style, color=colors.get(name),
                            label=f"{name}{'' if distilled else ' (not distilled)'}")
            colors[name] = line.get_color()
        for e in group:
            worst = e["sets"][e["worst_set"]]["change_pct"]
            ax.annotate(e["variant"] + (" (default)" if e["variant"] == default and distilled else ""),
                        (e["size_ratio_vs_fp32"], worst), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.axhline(10.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("size / fp32 size")
    ax.set_ylabel("perplexity change vs fp32 base, %")
    ax.set_title("SmolLM2-135M: size against quality per set")
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--race", default=None, help="the variant that gets the decode race")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-distill", action="store_true", help="stop before distillation: the calibration "
                        "and quantization variables alone, in a fraction of the time")
    parser.add_argument("--default", default=None, help="the variant params.yaml equals (marked in the table)")
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "bench-languages"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "languages.json"
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        entry = run_variant(name, Path(args.params), work, args.rounds if name == args.race else 0,
                            not args.no_distill)
        entries = json.loads(store.read_text()) if store.is_file() else []
        entries = [e for e in entries if (e["variant"], e["distilled"]) != (name, entry["distilled"])] + [entry]
        store.write_text(json.dumps(entries, indent=1) + "\n")
        (out / "languages.md").write_text(markdown(entries, args.default))
        plot(entries, out / "languages.png", args.default)
        print(json.dumps({k: entry[k] for k in ("variant", "worst_set", "size_ratio_vs_fp32", "wall_minutes")}),
              flush=True)


if __name__ == "__main__":
    main()
