"""The recipe schema: valid files load frozen, invalid ones list every problem with its key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from frugalflow.config import RecipeError
from frugalflow.recipe_io import flatten, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_default_params_is_valid_and_frozen():
    recipe = load_recipe(ROOT / "params.yaml")
    assert [s.kind for s in recipe.stages] == ["prune", "quantize", "distill"]
    with pytest.raises(ValidationError):
        recipe.seed = 3  # frozen
    flat = flatten(recipe)
    assert flat["stages.0.method"] == recipe.stages[0].method and flat["registry.model_name"] == recipe.registry.model_name


@pytest.mark.parametrize("text, expected", [
    ("stages:\n  - method: sparsegpt2\n", ["stages.0", "unknown method", "'magnitude'", "sparsegpt2"]),
    ("stages:\n  - method: magnitude\n    sparsity: 1.5\n", ["stages.0.sparsity", "1.5", "less than 1"]),
    ("stages:\n  - method: rtn\n    group_size: 100\n", ["stages.0.group_size", "32, 64, 128"]),
    ("stages:\n  - method: magnitude\n    pattern: '4:2'\n", ["stages.0.pattern", "N:M"]),
    ("stages:\n  - method: kl\n    stepz: 3\n", ["stages.0.stepz", "unknown key"]),
    ("stages: []\n", ["stages", "at least 1"]),
    ("stages:\n  - method: rtn\ngates:\n  max_ppl_increase_pct: -1\n", ["gates.max_ppl_increase_pct", "-1"]),
    ("stages:\n  - method: rtn\nschedule:\n  cron: '* *'\n", ["schedule.cron", "5 fields"]),
    ("stages:\n  - method: rtn\nschedule:\n  cron: '61 2 * * *'\n", ["schedule.cron", "61 2 * * *", "minute 0-59"]),
    ("stages:\n  - method: rtn\nschedule:\n  cron: '0 2 30 2 *'\n", ["schedule.cron", "a day the month has"]),
    ("stages:\n  - method: rtn\nschedule:\n  timezone: Mars/Olympus\n", ["schedule.timezone", "Mars/Olympus", "IANA"]),
    ("stages:\n  - method: rtn\n  - method: rtn\n", ["at most one quantize stage"]),
    ("stages:\n  - {method: rtn}\ndevice: tpu\n", ["device", "'auto'", "tpu"]),
])
def test_invalid_recipes_name_key_value_and_allowed(tmp_path, text, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_every_problem_is_listed(tmp_path):
    path = write(tmp_path, "stages:\n  - method: magnitude\n    sparsity: 2\n  - method: rtn\n    bits: 1\nfoo: 1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert len(info.value.problems) == 3


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="line 2, column 1: not valid YAML"):
        load_recipe(write(tmp_path, "stages: [\n"))
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_are_validated_like_the_file():
    recipe = load_recipe(ROOT / "params.yaml", ["stages.0.sparsity=0.6", "registry.objective=size_mb"])
    assert recipe.stages[0].sparsity == 0.6 and recipe.registry.objective == "size_mb"
    with pytest.raises(RecipeError, match="stages.0.sparsity"):
        load_recipe(ROOT / "params.yaml", ["stages.0.sparsity=7"])
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(ROOT / "params.yaml", ["stages.9.sparsity=0.1"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(ROOT / "params.yaml", ["stages.0.sparsity"])


def test_cli_validate_exit_codes(tmp_path):
    good = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(ROOT / "params.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0 and "ok" in good.stdout
    bad = write(tmp_path, "stages:\n  - method: magnitude\n    sparsity: 3\n")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(bad)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 2 and "stages.0.sparsity" in out.stderr and "3" in out.stderr
    as_run = subprocess.run([sys.executable, "-m", "flows.cli", "validate", "-p", str(bad)], capture_output=True,
                            text=True, cwd=ROOT)  # -p FILE, as `run` takes it
    assert as_run.returncode == 2 and "stages.0.sparsity" in as_run.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert [s.kind for s in recipe.stages]


@pytest.mark.parametrize("key,value", [("registry.model_name", ".."), ("registry.model_name", "../escape"),
                                       ("registry.model_name", ".hidden"), ("registry.model_name", "a/b"),
                                       ("name", ".."), ("name", "x/../../y")])
def test_names_used_as_paths_cannot_leave_their_folder(key, value):
    """The recipe name and the registered model name become parts of paths and S3 keys
    (`<models>/<name>/v<N>`): no separator, never '.', '..' or a hidden name."""
    with pytest.raises(RecipeError, match=key.split(".")[-1]):
        load_recipe(ROOT / "params.yaml", [f"{key}={value}"])
    assert load_recipe(ROOT / "params.yaml", [f"{key}=team.model-2"])


@pytest.mark.parametrize("text, key, lines", [
    ("name: a\nstages:\n  - method: rtn\nname: b\n", "name", (1, 4)),
    ("stages:\n  - method: rtn\nschedule:\n  cron: '0 2 * * *'\n  timezone: UTC\n  cron: '0 3 * * *'\n",
     "schedule.cron", (4, 6)),
    ("stages:\n  - method: magnitude\n    sparsity: 0.5\n    sparsity: 0.6\n", "stages.0.sparsity", (3, 4)),
    ("stages:\n  - {method: rtn, bits: 4, bits: 8}\n", "stages.0.bits", (2, 2)),
])
def test_a_key_given_twice_is_refused_with_its_path_and_lines(tmp_path, text, key, lines):
    """PyYAML keeps the later of two equal keys silently; the recipe reader refuses, naming both lines."""
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    assert info.value.problems == [f"{key}: key given twice (lines {lines[0]} and {lines[1]}); YAML would keep "
                                   "only the later one silently: remove one"]


def test_merge_keys_and_aliases_are_not_duplicates(tmp_path):
    text = ("stages:\n  - &prune {method: magnitude, sparsity: 0.5}\n  - method: rtn\n"
            "sweep:\n  grid:\n    stages.0.sparsity: [0.1, 0.2]\n"
            "gates: &g {max_ppl_increase_pct: 10.0}\nregistry:\n  <<: {model_name: x}\n  model_name: y\n")
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.registry.model_name == "y" and recipe.stages[0].sparsity == 0.5  # an explicit key overrides a merge
    with pytest.raises(RecipeError, match="stages.0.k: key given twice"):  # in an override value too
        load_recipe(write(tmp_path, "stages:\n  - method: rtn\n"), ["stages.0={method: rtn, k: 1, k: 2}"])
