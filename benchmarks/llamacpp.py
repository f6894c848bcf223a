"""frugalflow's GGUF against llama.cpp's own quantizer, both measured in llama.cpp in one run: file size,
bits per weight, `llama-perplexity` on every evaluation set, `llama-bench` prompt and generation
tokens/s, and frugalflow's own runtime perplexity for its models.

    python benchmarks/llamacpp.py --model NAME=MODEL [--model ...] [--chunks 20]

MODEL: a frugalflow model directory or a registered version (models:/smollm2-frugal@champion, read
from the recipe's tracking store or MLFLOW_TRACKING_URI); each is exported with `frugalflow export`'s
defaults. llama.cpp's side: the base exported as F32, an importance matrix from the calibration
split's text (`llama-imatrix`), then `llama-quantize --imatrix` to each of --types (default Q4_0,
Q4_K_M, IQ4_XS). Sets: the prepared eval split (in domain) and params.yaml's `evaluation.sets`, each
given to llama.cpp as text (its windows decoded) and scored on its first --chunks chunks of 512 tokens.
Needs `make llamacpp`. Writes llamacpp.json and llamacpp.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.domains import recipe_and_folders  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from frugalflow.data import load_windows  # noqa: E402
from frugalflow.evaluate import llamacpp  # noqa: E402
from frugalflow.evaluate.perplexity import perplexity  # noqa: E402
from frugalflow.evaluate.sets import every_set  # noqa: E402
from frugalflow.export import export  # noqa: E402
from frugalflow.models import load_model, load_tokenizer  # noqa: E402

PARAMS = 134_515_008  # SmolLM2-135M, tied head counted once


def model_dir(spec: str, work: Path, tracking_uri: str) -> Path:
    """A model directory for NAME=MODEL: the folder itself, or a registered version downloaded."""
    if not spec.startswith("models:/"):
        return Path(spec)
    from tasks import tracking as T
    from tasks.serving import resolve

    client = T.connect(T.resolve_uri(tracking_uri, ROOT))  # MLFLOW_TRACKING_URI first, else the recipe's
    version = resolve(client, spec)
    dest = work / f"registry-{version.name}-v{version.version}"
    if not (dest / "model" / "config.json").is_file():
        client.download_artifacts(version.run_id, "model", str(dest))
    return dest / "model"


def llama_perplexity(gguf: Path, text: Path, chunks: int) -> float:
    log = llamacpp.run_tool("llama-perplexity", "-m", gguf, "-f", text, "-c", 512, "-b", 512, "--chunks", chunks,
                            "-t", os.cpu_count())
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))


def llama_bench(gguf: Path, reps: int) -> dict:
    """Median prompt (512 tokens) and generation (64 tokens) tokens/s, as llama-bench reports them."""
    out = llamacpp.run_tool("llama-bench", "-m", gguf, "-p", 512, "-n", 64, "-r", reps, "-o", "json",
                            "-t", os.cpu_count())
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    by = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    return {"prompt_tps": round(by["pp"], 1), "gen_tps": round(by["tg"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--model", action="append", default=[], metavar="NAME=MODEL")
    parser.add_argument("--types", default="Q4_0,Q4_K_M,IQ4_XS")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5, help="llama-bench repetitions")
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "bench-llamacpp"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    recipe, base, data, work = recipe_and_folders(args.params, args.work)
    started = time.time()
    tokenizer = load_tokenizer(base)
    sets = every_set(recipe.evaluation.sets, data, tokenizer, ROOT)
    texts = {}
    for name, windows in {**sets, "calib": load_windows(data, "calib")}.items():
        texts[name] = work / f"{name}.txt"
        texts[name].write_text(tokenizer.decode(windows.reshape(-1)))

    files, seconds = {}, {}
    files["F32 (frugalflow export of the base)"] = work / "base-f32.gguf"
    if not files["F32 (frugalflow export of the base)"].exists():
        export("gguf", base, work / "base-f32.gguf", float_type="f32")
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists():
        t = time.perf_counter()
        llamacpp.run_tool("llama-imatrix", "-m", work / "base-f32.gguf", "-f", texts["calib"], "-o", imatrix,
                          "-c", 512, "-t", os.cpu_count())
        seconds["llama-imatrix"] = round(time.perf_counter() - t, 1)
    for qtype in args.types.split(","):
        out = work / f"llama-{qtype}.gguf"
        if not out.exists():
            t = time.perf_counter()
            llamacpp.run_tool("llama-quantize", "--imatrix", imatrix, work / "base-f32.gguf", out, qtype)
            seconds[f"llama-quantize {qtype}"] = round(time.perf_counter() - t, 1)
        files[f"llama.cpp {qtype} (imatrix)"] = out
    ours = {}
    for spec in args.model:
        name, _, source = spec.partition("=")
        folder = model_dir(source, work, recipe.tracking.uri)
        out = work / f"frugalflow-{name}.gguf"
        if not out.exists():
            export("gguf", folder, out)
        files[f"frugalflow {name}"] = out
        ours[f"frugalflow {name}"] = folder

    rows = []
    for label, path in files.items():
        row = {"file": label, "mb": round(path.stat().st_size / 1e6, 1),
               "bpw": round(path.stat().st_size * 8 / PARAMS, 2),
               "ppl": {s: llama_perplexity(path, texts[s], args.chunks) for s in sets}, **llama_bench(path, args.reps)}
        if label in ours:
            model = load_model(ours[label])
            row["ours_ppl"] = {s: round(perplexity(model, w[:args.chunks]), 3) for s, w in sets.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": describe(), "chunks": args.chunks,
              "sets": list(sets), "seconds": seconds, "minutes": round((time.time() - started) / 60, 1), "rows": rows}
    out_dir = Path(args.out)
    (out_dir / "llamacpp.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "llamacpp.md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    base = result["rows"][0]["ppl"]
    head = " | ".join(result["sets"])
    lines = [f"# frugalflow GGUF vs llama.cpp's quantizer, in llama.cpp ({result['date']})", "",
             f"{result['machine']}; llama-perplexity, 512-token chunks, the first {result['chunks']} of each set; "
             f"change against the first row; llama-bench pp512 / tg64 tokens/s. Seconds: {result['seconds']}.", "",
             f"| file | MB | bits/weight | {head} | prompt tok/s | gen tok/s |",
             "|---|---|---|" + "---|" * len(result["sets"]) + "---|---|"]
    for i, row in enumerate(result["rows"]):
        cells = [f"{v:.2f}" if i == 0 else f"{(v / base[s] - 1) * 100:+.1f}%" for s, v in row["ppl"].items()]
        lines.append(f"| {row['file']} | {row['mb']} | {row['bpw']} | " + " | ".join(cells)
                     + f" | {row['prompt_tps']} | {row['gen_tps']} |")
    ours = [r for r in result["rows"] if "ours_ppl" in r]
    if ours:
        lines += ["", "frugalflow's own runtime on the same models (its windows of each set, perplexity):", ""]
        lines += [f"- {r['file']}: " + ", ".join(f"{s} {v}" for s, v in r["ours_ppl"].items()) for r in ours]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
