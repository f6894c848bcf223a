"""Property tests (hypothesis) over the recipe loader and `-s KEY=VALUE` overrides: whatever the
file holds and whatever is overridden, the result is a valid Recipe or a RecipeError (exit 2 with
one line per problem), never another exception. Examples are bounded so this runs in seconds."""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.cli import main
from frugalflow.config import Recipe, RecipeError
from frugalflow.recipe_io import flatten, load_recipe

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "params.yaml").read_text())
KEYS = sorted(flatten(load_recipe(ROOT / "params.yaml")))  # every real key path, e.g. stages.0.sparsity
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
segments = st.one_of(st.sampled_from(["stages", "0", "1", "2", "9", "-1", "data", "gates", "name", "method",
                                      "sparsity", "bits", "registry", "evaluation", "sets", ""]),
                     st.text(max_size=6))
key_paths = st.one_of(st.sampled_from(KEYS), st.lists(segments, min_size=1, max_size=4).map(".".join))
raw_values = st.one_of(st.text(max_size=20), st.sampled_from(["", "null", "[1, 2", "{a: 1}", "2:4", "1e309",
                                                               "-.inf", "!!python/object:os.system x", "*a",
                                                               "&a [*a]", "0x1F", "yes", "~"]))
overrides = st.one_of(st.tuples(key_paths, raw_values).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=20))


def clean(load) -> Recipe | None:
    """Run `load`; a Recipe or None for a RecipeError; anything else fails the property."""
    try:
        return load()
    except RecipeError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return None


FOLDERS = tempfile.TemporaryDirectory(prefix="fuzz-")  # removed when the test process ends


def write(text: str | bytes) -> Path:
    folder = Path(tempfile.mkdtemp(dir=FOLDERS.name))
    path = folder / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return path


@FAST
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_file_content_is_a_recipe_or_a_recipe_error(content):
    clean(lambda: load_recipe(write(content), checks="file"))


@FAST
@given(values)
def test_any_yaml_structure_is_a_recipe_or_a_recipe_error(data):
    clean(lambda: load_recipe(write(yaml.safe_dump(data)), checks="file"))


@FAST
@given(st.sampled_from(KEYS), values)
def test_any_value_at_any_key_of_the_real_recipe(key, value):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    node, parts = data, key.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
    clean(lambda: load_recipe(write(yaml.safe_dump(data)), checks="file"))


@FAST
@given(st.lists(overrides, min_size=1, max_size=3))
def test_any_overrides_are_a_recipe_or_a_recipe_error(sets):
    recipe = clean(lambda: load_recipe(ROOT / "params.yaml", sets))
    if recipe is not None:  # what the overrides said is what the recipe holds
        assert isinstance(recipe, Recipe)


@settings(max_examples=25, deadline=None)
@given(st.lists(overrides, min_size=1, max_size=2))
def test_validate_exits_0_or_2_on_any_overrides(sets):
    argv = ["validate", str(write(yaml.safe_dump(BASE)))]
    for s in sets:
        argv += ["-s", s]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code in (0, 2)
