"""Named perplexity sets: splits and text files, windowing, errors, the cache key; speed metrics."""
from __future__ import annotations

import json
import math
import pydoc_data.topics
import shutil

import pytest
import torch
from safetensors.torch import save_file

from frugalflow.config import EvaluationConfig, RecipeError
from frugalflow.evaluate.perplexity import perplexity
from frugalflow.evaluate.sets import project_root_of
from frugalflow.evaluate.suite import evaluate_model, evaluation_key
from frugalflow.models import load_model
from frugalflow.recipe_io import recipe_from_dict

WINDOW = 32
TOPICS = pydoc_data.topics.topics
FAST = {"decode_tokens": 4, "decode_repeats": 1}


@pytest.fixture
def project(tmp_path, tiny_tokenizer):
    """A project root (dvc.yaml) with data/ (eval split + manifest) and two text documents."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    data = tmp_path / "data"
    data.mkdir()
    ids = tiny_tokenizer(TOPICS["assert"] + TOPICS["global"], add_special_tokens=False).input_ids
    save_file({"windows": torch.tensor(ids[: 4 * WINDOW]).reshape(4, WINDOW)}, str(data / "eval.safetensors"))
    save_file({"windows": torch.tensor(ids[4 * WINDOW: 6 * WINDOW]).reshape(2, WINDOW)},
              str(data / "train.safetensors"))
    (data / "manifest.json").write_text(json.dumps({"window": WINDOW}))
    notes = tmp_path / "evals" / "notes"
    notes.mkdir(parents=True)
    (notes / "a.txt").write_text(TOPICS["del"])
    (notes / "b.txt").write_text(TOPICS["return"])
    (tmp_path / "copy").mkdir()
    shutil.copy(notes / "a.txt", tmp_path / "copy" / "a.txt")
    return tmp_path


def cfg(**sets) -> EvaluationConfig:
    return EvaluationConfig(**FAST, sets=sets)


def test_named_sets_give_ppl_per_text(project, tiny_model_dir, tiny_tokenizer):
    c = cfg(ev={"split": "eval"}, tr={"split": "train", "max_windows": 1}, a={"text_files": "evals/notes/a.txt"},
            a_copy={"text_files": ["copy/*.txt"]}, b={"text_files": "evals/notes/b.txt", "max_windows": 3},
            both={"text_files": ["evals/notes/*.txt"]})
    m = evaluate_model(tiny_model_dir, project / "data", c)  # root found from data/ upwards (dvc.yaml)
    assert m["ppl.ev"] == m["ppl"] and m["windows.ev"] == m["eval_windows"] == 4
    assert m["windows.tr"] == 1 and m["ppl.tr"] != m["ppl"]
    assert m["ppl.a"] == m["ppl.a_copy"] and m["windows.a"] == m["windows.a_copy"]
    assert m["ppl.a"] != m["ppl.b"] and m["windows.b"] == 3
    # the windows are the documents' tokens, cut into WINDOW-token windows (sorted file order, blank line join)
    model = load_model(tiny_model_dir)
    ids = tiny_tokenizer(TOPICS["del"], add_special_tokens=False).input_ids
    n = len(ids) // WINDOW
    assert m["windows.a"] == n > 1
    want = perplexity(model, torch.tensor(ids[: n * WINDOW]).reshape(n, WINDOW))
    assert math.isclose(m["ppl.a"], want, rel_tol=1e-9)
    joined = tiny_tokenizer(TOPICS["del"] + "\n\n" + TOPICS["return"], add_special_tokens=False).input_ids
    assert m["windows.both"] == len(joined) // WINDOW


def test_text_window_override_and_explicit_root(project, tiny_model_dir, tmp_path_factory):
    c = cfg(a={"text_files": "evals/notes/a.txt", "window": 16})
    elsewhere = tmp_path_factory.mktemp("other")  # no dvc.yaml above: root given explicitly
    data = elsewhere / "data"
    shutil.copytree(project / "data", data)
    m = evaluate_model(tiny_model_dir, data, c, root=project)
    base = evaluate_model(tiny_model_dir, project / "data", cfg(a={"text_files": "evals/notes/a.txt"}))
    assert m["windows.a"] >= 2 * base["windows.a"] and m["ppl.a"] != base["ppl.a"]


def test_missing_and_short_files_are_recipe_errors(project, tiny_model_dir):
    with pytest.raises(RecipeError) as err:
        evaluation_key(tiny_model_dir, project / "data", cfg(n={"text_files": ["evals/nope/*.txt", "x.txt"]}), "cpu")
    assert len(err.value.problems) == 2
    assert "evaluation.sets.n.text_files: 'evals/nope/*.txt' matches no file" in err.value.problems[0]
    (project / "short.txt").write_text("tiny")
    with pytest.raises(RecipeError, match=r"evaluation.sets.s: \d+ tokens in 1 file\(s\), fewer than one window"):
        evaluate_model(tiny_model_dir, project / "data", cfg(s={"text_files": "short.txt"}))
    with pytest.raises(RecipeError, match="evaluation.sets.c.split: .*calib.safetensors is missing"):
        evaluate_model(tiny_model_dir, project / "data", cfg(c={"split": "calib"}))


def test_cache_key_follows_set_files_and_settings(project, tiny_model_dir):
    data = project / "data"
    c = cfg(a={"text_files": "evals/notes/*.txt"})
    key = evaluation_key(tiny_model_dir, data, c, "cpu")
    assert evaluation_key(tiny_model_dir, data, c, "cpu", root=project) == key
    assert evaluation_key(tiny_model_dir, data, cfg(), "cpu") != key
    assert evaluation_key(tiny_model_dir, data, cfg(a={"text_files": "evals/notes/*.txt", "max_windows": 1}),
                          "cpu") != key
    (project / "evals" / "notes" / "b.txt").write_text(TOPICS["while"])  # a file's content changes
    changed = evaluation_key(tiny_model_dir, data, c, "cpu")
    assert changed != key
    (project / "evals" / "notes" / "c.txt").write_text(TOPICS["if"])  # a new file matches the glob
    assert evaluation_key(tiny_model_dir, data, c, "cpu") not in (key, changed)
    (data / "manifest.json").write_text(json.dumps({"window": 16}))  # the window text sets are cut into
    assert evaluation_key(tiny_model_dir, data, c, "cpu") not in (key, changed)


def test_set_config_is_validated():
    base = {"stages": [{"method": "rtn"}]}
    bad = [({"x": {"split": "eval", "text_files": "a.txt"}}, "exactly one of split"),
           ({"x": {}}, "exactly one of split"),
           ({"x": {"split": "test"}}, "evaluation.sets.x.split"),
           ({"x": {"text_files": []}}, "at least one"),
           ({"x": {"split": "eval", "window": 8}}, "text_files only"),
           ({"a.b": {"split": "eval"}}, "set names")]
    for sets, words in bad:
        with pytest.raises(RecipeError, match=words.replace(".", r"\.")):
            recipe_from_dict({**base, "evaluation": {"sets": sets}})
    recipe = recipe_from_dict({**base, "evaluation": {"sets": {"notes": {"text_files": "n/*.txt"}}}})
    assert recipe.evaluation.sets["notes"].text_files == ["n/*.txt"]


def test_project_root_of(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("")
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert project_root_of(tmp_path / "a" / "b") == tmp_path.resolve()
    monkeypatch.chdir(tmp_path / "a")
    assert project_root_of(tmp_path.parent) == (tmp_path / "a").resolve()  # no dvc.yaml above: the cwd
