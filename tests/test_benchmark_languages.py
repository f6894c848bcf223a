"""benchmarks/languages.py: each variant is a valid recipe that changes one variable from the one
before it, its data prepared with the calibration windows it names, and the table and frontier drawn."""
from __future__ import annotations

import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.languages import VARIANTS, markdown, plot, prepared, variant_recipe  # noqa: E402


def test_variants_are_valid_recipes_one_variable_apart():
    recipes = {name: variant_recipe(ROOT / "params.yaml", keys) for name, keys in VARIANTS.items()}
    english, mixed = recipes["english"], recipes["calib-mix"]
    assert english.data.calib_mix == {} and english.data.calib_windows == 32
    assert set(mixed.data.calib_mix) == {"french", "german", "russian"}
    assert mixed.data.calib_windows + sum(m.windows for m in mixed.data.calib_mix.values()) == 32  # as many
    assert english.stages[1:] == mixed.stages[1:]  # only the calibration text differs
    prompts = recipes["gen-prompts"]
    assert prompts.data == english.data and prompts.stages[:2] == english.stages[:2]
    assert len(prompts.stages[2].generated_prompts) == 4 and english.stages[2].generated_prompts == []
    assert recipes["calib-mix-share60"].stages[1].mixed.share == 0.6
    for spec in mixed.data.calib_mix.values():
        for pattern in spec.text_files:
            assert (ROOT / pattern).is_file()


def test_mixed_calibration_is_prepared_in_its_own_folder(tmp_path, tiny_model_dir):
    recipe = variant_recipe(ROOT / "params.yaml", {**VARIANTS["calib-mix"], "data.window": 64})
    folder = prepared(recipe, tmp_path, tiny_model_dir)
    import json

    calib = json.loads((folder / "manifest.json").read_text())["splits"]["calib"]
    assert {k: v["windows"] for k, v in calib["sources"].items()} == {
        "pydoc_topics": 20, "french": 4, "german": 4, "russian": 4}
    assert prepared(recipe, tmp_path, tiny_model_dir) == folder  # once per data configuration


def test_table_and_frontier(tmp_path):
    def entry(name, distilled, size, changes):
        sets = {n: {"change_pct": c, "before_change_pct": c + 1} for n, c in changes.items()}
        return {"variant": name, "distilled": distilled, "calibration": {"pydoc_topics": {"windows": 32}},
                "distill_prompts": [] if distilled else None, "quantization": "w4", "sets": sets,
                "worst_set": max(changes, key=changes.get), "size_ratio_vs_fp32": size, "decode_vs_fp32": None,
                "wall_minutes": 1.0, "machine": "m", "load_average": 2.0, "date": "d"}
    entries = [entry("english", False, 0.2, {"eval": 5.0, "french": 30.0}),
               entry("calib-mix", True, 0.22, {"eval": 4.0, "french": 9.0})]
    table = markdown(entries, "calib-mix")
    assert "| english | pydoc_topics 32 | not distilled | w4 | (+6.00) | (+31.00) | french +30.00 |" in table
    assert "| **calib-mix** |" in table and "+9.00 (+10.00)" in table
    plot(entries, tmp_path / "f.png", "calib-mix")
    assert (tmp_path / "f.png").stat().st_size > 10_000
