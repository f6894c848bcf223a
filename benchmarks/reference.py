"""frugalflow against llm-compressor at 4-bit, SmolLM2-135M: perplexity on every evaluation set and
compression time, both sides in one run on the same machine, the same base model and the same
calibration windows.

    python benchmarks/reference.py --reference-python PATH [--reference gptq,awq] [--ours gptq,...]

`--reference-python`: the Python of a separate environment with llmcompressor installed (it pins
another transformers than frugalflow's lock), e.g. `python -m venv REF && REF/bin/pip install
torch==2.13.0 llmcompressor==0.14.0.1`, then `--reference-python REF/bin/python` (REF: any folder
outside the project). Each reference method runs there through
benchmarks/llmcompressor_run.py (4-bit asymmetric, groups of 64, the output head left as it is, its
defaults otherwise); its dequantized weights come back and are evaluated here, like ours, on the
prepared eval split (in domain: the calibration corpus) and params.yaml's `evaluation.sets` (out of
domain), all windows. Ours run through the library's `run_stage` (load, quantize, pack, save).
Seconds: the reference's `oneshot` call; ours, the whole stage. Bits per weight: stored bits of the
decoder linears with scales and zero points; the reference's counted as compressed-tensors stores
it (4-bit codes and zero points, 16-bit scales). Writes reference.json and reference.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import TypeAdapter
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from frugalflow.config import Stage  # noqa: E402
from frugalflow.data import load_windows  # noqa: E402
from frugalflow.evaluate.perplexity import perplexity  # noqa: E402
from frugalflow.evaluate.sets import every_set  # noqa: E402
from frugalflow.models import load_model, load_tokenizer  # noqa: E402
from frugalflow.recipe_io import load_recipe  # noqa: E402
from frugalflow.stages import run_stage  # noqa: E402

W4 = {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False, "act_order": True}
OURS = {  # name: quantize stage settings
    "gptq": W4,
    "gptq_clip": {**W4, "clip_search": True},
    "awq": {"method": "awq", "bits": 4, "group_size": 64, "symmetric": False},
    "awq_scales+gptq_clip": {**W4, "clip_search": True, "awq_scales": True},
    "awq_scales+gptq_clip_damp0.1": {**W4, "clip_search": True, "awq_scales": True, "dampening": 0.1},
    "awq_scales+gptq_clip_damp0.1_bf16": {**W4, "clip_search": True, "awq_scales": True, "dampening": 0.1,
                                          "calibration_dtype": "bfloat16"},
    # groups of 32 at 4.5 bits per weight: one-byte (log8) scales; AWQ's grid of 10, no propagation forward
    "awq_scales10+gptq_clip_damp0.3_bf16_g32log8_noprop": {
        **W4, "group_size": 32, "scale_format": "log8", "clip_search": True, "awq_scales": True, "awq_grid": 10,
        "dampening": 0.3, "calibration_dtype": "bfloat16", "propagate": False},
}
REFERENCE_BPW = 4 + (16 + 4) / 64  # compressed-tensors pack-quantized, asymmetric, groups of 64


def reference_run(python: str, method: str, base: Path, calib: Path, out: Path) -> dict:
    command = [python, str(ROOT / "benchmarks" / "llmcompressor_run.py"), "--model", str(base), "--calib", str(calib),
               "--method", method, "--group-size", "64", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if done.returncode != 0:
        raise SystemExit(f"llm-compressor {method} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--reference-python", required=True)
    parser.add_argument("--reference", default="gptq,awq", help="llm-compressor methods: gptq, awq, awq_gptq")
    parser.add_argument("--ours", default=",".join(OURS), help=f"frugalflow variants: {', '.join(OURS)}")
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "bench-reference"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    recipe = load_recipe(args.params)
    base, data, work = ROOT / recipe.base_model.path, ROOT / recipe.data.path, Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(base)
    sets = every_set(recipe.evaluation.sets, data, tokenizer, ROOT)

    def evaluate(model) -> dict[str, float]:
        return {name: round(perplexity(model, w), 3) for name, w in sets.items()}

    rows = [{"side": "base", "method": "fp32", "bits_per_weight": 32.0, "seconds": 0.0, "ppl": evaluate(load_model(base))}]
    print(rows[0], flush=True)
    for method in args.reference.split(","):
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            weights = Path(tmp) / "weights.safetensors"
            ran = reference_run(args.reference_python, method, base, data / "calib.safetensors", weights)
            model = load_model(base)
            model.load_state_dict(load_file(str(weights)), strict=False)
            model.tie_weights()
        rows.append({"side": f"llm-compressor {ran['llmcompressor']}", "method": method,
                     "bits_per_weight": REFERENCE_BPW, "seconds": ran["seconds"], "ppl": evaluate(model)})
        del model
        print(rows[-1], flush=True)
    for name in args.ours.split(","):
        stage = TypeAdapter(Stage).validate_python(OURS[name])
        out = work / f"ours-{name}"
        shutil.rmtree(out, ignore_errors=True)  # this benchmark's own output from an earlier run
        stats = run_stage(stage, base, out, data_dir=data, teacher_dir=base, seed=recipe.seed)
        rows.append({"side": "frugalflow", "method": name, "settings": OURS[name],
                     "bits_per_weight": round(stats["bits_per_weight"], 4), "seconds": round(stats["seconds"], 1),
                     "ppl": evaluate(load_model(out))})
        print(rows[-1], flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "calibration": f"{len(load_windows(data, 'calib'))} x 512 "
              "tokens of the calibration corpus (data/calib)", "windows": {k: len(v) for k, v in sets.items()},
              "machine": describe(), "load_average": round(os.getloadavg()[0], 1),
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "reference.md").write_text(markdown(result))
    print((out / "reference.md").read_text())


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = rows[0]["ppl"]
    names = list(base)
    reference = [r for r in rows if r["side"].startswith("llm-compressor")]
    best = {n: min(r["ppl"][n] for r in reference) for n in names} if reference else {}
    fastest = min((r["seconds"] for r in reference), default=None)
    lines = ["# frugalflow vs llm-compressor at 4 bits, SmolLM2-135M-Instruct", "",
             f"Machine: {result['machine']}, load average {result['load_average']}. Date: {result['date']}. Produced by "
             "`python benchmarks/reference.py --reference-python PATH` (one run: every row below, one after the "
             f"other). Calibration: {result['calibration']}, the same for every row. Perplexity: fp32 activations, "
             "all windows of each set (" + ", ".join(f"{k} {v}" for k, v in result["windows"].items()) + "); `eval` is "
             "in domain, the others out of domain. vs best reference: perplexity relative to llm-compressor's best "
             "row on that set (issue 16 asks for -5% or lower on every set at <= 4.5 bits per weight, in at most "
             "half the reference's time).", "",
             "| side | method | bits per weight | seconds | " + " | ".join(f"{n} ppl (change %)" for n in names)
             + " | " + " | ".join(f"{n} vs best reference %" for n in names) + " |",
             "|" + "---|" * (4 + 2 * len(names))]
    for r in rows:
        cells = [r["side"], r["method"], f"{r['bits_per_weight']:.3f}", f"{r['seconds']:.1f}"]
        cells += [f"{r['ppl'][n]:.3f} ({(r['ppl'][n] / base[n] - 1) * 100:+.2f})" for n in names]
        cells += [f"{(r['ppl'][n] / best[n] - 1) * 100:+.2f}" if best and r["side"] == "frugalflow" else "" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    if fastest is not None:
        lines += ["", f"The reference's fastest method took {fastest:.1f} s; half of it is {fastest / 2:.1f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
