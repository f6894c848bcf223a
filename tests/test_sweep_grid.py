"""Sweep grids: option parsing, expansion order, labels, and overrides the recipe loader accepts."""
from __future__ import annotations

import pytest

from frugalflow.config import RecipeError
from frugalflow.recipe_io import load_recipe
from frugalflow.sweep import as_overrides, expand_grid, label, parse_grid_option


def test_parse_grid_option_reads_yaml_scalars():
    assert parse_grid_option("stages.0.sparsity=0.1, 0.3") == ("stages.0.sparsity", [0.1, 0.3])
    assert parse_grid_option("stages.1.bits=4,8") == ("stages.1.bits", [4, 8])
    assert parse_grid_option("stages.0.pattern=2:4,unstructured") == ("stages.0.pattern", ["2:4", "unstructured"])


@pytest.mark.parametrize("bad", ["stages.0.sparsity", "stages.0.sparsity=", "=0.1,0.2", "stages.0.sparsity= , "])
def test_parse_grid_option_rejects_malformed(bad):
    with pytest.raises(RecipeError, match="KEY=V1,V2"):
        parse_grid_option(bad)


def test_expand_grid_is_the_full_product_last_key_fastest():
    points = expand_grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert points == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
                      {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]
    assert expand_grid({}) == [{}]


def test_label_and_overrides_round_trip_through_the_recipe_loader(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("stages:\n  - {method: wanda, sparsity: 0.1}\n  - {method: rtn, bits: 4}\n")
    point = {"stages.0.pattern": "2:4", "stages.1.bits": 8}
    assert label(point) == "pattern=2:4,bits=8"
    recipe = load_recipe(params, as_overrides(point))
    assert recipe.stages[0].pattern == "2:4" and recipe.stages[1].bits == 8


def test_recipe_sweep_section_is_validated(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("stages:\n  - {method: rtn}\nsweep:\n  grid:\n    data.window: [256, 512]\n")
    with pytest.raises(RecipeError, match="cannot be swept"):
        load_recipe(params)
    params.write_text("stages:\n  - {method: rtn}\nsweep:\n  grid:\n    stages.0.bits: [4, 8]\n  max_parallel: 0\n")
    with pytest.raises(RecipeError, match="max_parallel"):
        load_recipe(params)


def test_override_keeps_n_m_patterns_as_strings(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("stages:\n  - {method: sparsegpt}\n")
    assert load_recipe(params, ["stages.0.pattern=2:4"]).stages[0].pattern == "2:4"
