"""The speed gate is on in the default recipe (issue #40 item 4): `gates.min_decode_speedup` in params.yaml
judges the decode race of the candidate's own evaluation, passes the default recipe's packed model at the
speed-up benchmarks measured for it, and fails a candidate no faster than the base model; the tiny test
recipes carry no speed gate, so a tiny model that does not speed up cannot fail a test night on it."""
from __future__ import annotations

import json
from pathlib import Path

from helpers import ROOT, tiny_recipe

from frugalflow.gates import verdict
from frugalflow.recipe_io import load_recipe

RESULTS = ROOT / "benchmarks" / "results"


def default_gates():
    recipe = load_recipe(ROOT / "params.yaml")
    return recipe, recipe.gates.model_copy(update={"max_ppl_increase_pct": None, "min_size_reduction": None})


def speed_gate(candidate: dict, baseline: dict, gates) -> dict:
    return next(g for g in verdict(candidate, baseline, gates, None, "ppl")["gates"] if g["name"] == "decode_speedup")


def test_default_recipe_gates_on_the_same_run_race():
    recipe, gates = default_gates()
    assert gates.min_decode_speedup is not None and gates.min_decode_speedup > 1.0
    assert recipe.evaluation.decode_race_rounds >= 1  # the gate reads the race, not the cached baseline figure
    # a candidate no faster than the base raced beside it fails, though the cached baseline figure is slower
    slow = speed_gate({"ppl": 1.0, "decode_tps": 10.0, "base_decode_tps": 10.0}, {"decode_tps": 5.0}, gates)
    assert slow["status"] == "fail" and slow["reference"].startswith("base model, interleaved")
    # a shared host's nights turn it off for one run (README, speed_gate.md)
    assert load_recipe(ROOT / "params.yaml", ["gates.min_decode_speedup=null"]).gates.min_decode_speedup is None


def test_default_recipe_passes_at_its_measured_speedup():
    """The default recipe's packed model raced against the fp32 base on a quiet host (benchmarks/languages.py,
    the variant params.yaml uses: the race params.yaml's threshold is set from) passes, with margin."""
    _, gates = default_gates()
    share60 = next(e for e in json.loads((RESULTS / "languages.json").read_text()) if e.get("decode_tps"))
    assert share60["variant"] == "calib-mix-share60"
    tps = share60["decode_tps"]
    measured = {"ppl": 1.0, "decode_tps": tps["final_fp32"], "base_decode_tps": tps["base_fp32"]}
    gate = speed_gate(measured, {}, gates)
    assert gate["status"] == "pass" and gate["value"] >= 1.25 * gates.min_decode_speedup


def test_tiny_test_recipes_have_no_speed_gate(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(tiny_recipe(Path("/nonexistent"), "tiny")))  # JSON is YAML
    assert load_recipe(params).gates.min_decode_speedup is None
