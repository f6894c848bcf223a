"""Evaluation outside the calibration domain: the shipped domain sets, the worst-set perplexity
gate, the decode race against the base model, and the side-by-side report."""
from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

import pytest
import torch
import yaml

from frugalflow.config import GatesConfig
from frugalflow.data import load_windows
from frugalflow.evaluate.race import decode_race
from frugalflow.evaluate.sets import every_set, resolve_files, set_windows
from frugalflow.gates import describe, verdict
from frugalflow.recipe_io import load_recipe
from frugalflow.report import build_report, sets_section, summary_markdown, to_html, to_markdown

ROOT = Path(__file__).resolve().parents[1]
BASE = {"ppl": 10.0, "ppl.fiction": 20.0, "ppl.legal": 8.0, "size_mb": 400.0, "decode_tps": 10.0}


# --------------------------------------------------------------------------- the shipped sets
@pytest.mark.parametrize("recipe_file", ["params.yaml", "recipes/sparsegpt_awq_tsld.yaml",
                                         "recipes/structured_distill_int8.yaml"])
def test_recipes_evaluate_two_text_domains_outside_the_calibration_corpus(recipe_file, tiny_tokenizer, tmp_path):
    recipe = load_recipe(ROOT / recipe_file)
    sets = recipe.evaluation.sets
    text_sets = {name: spec for name, spec in sets.items() if spec.text_files}
    assert len(text_sets) >= 2, sets
    calibration = "\n".join(pydoc_data.topics.topics.values())
    words = {}
    for name, spec in text_sets.items():
        files = resolve_files(name, spec.text_files, ROOT)
        assert files and all(f.is_relative_to(ROOT / "evals") for f in files)
        text = "\n".join(f.read_text(encoding="utf-8") for f in files)
        assert len(text) > 40_000, (name, len(text))  # enough for 16-24 windows of SmolLM2's 512 tokens
        # not the calibration domain: no 120-character passage of the set occurs in the pydoc topics
        probes = [text[i:i + 120] for i in range(0, len(text) - 120, len(text) // 50)]
        assert not any(p in calibration for p in probes), name
        words[name] = set(text.lower().split())
        (tmp_path / "manifest.json").write_text('{"window": 64}')
        windows = set_windows(name, spec, tmp_path, tiny_tokenizer, ROOT)
        assert windows.shape == (spec.max_windows, 64)
    a, b = list(words.values())[:2]  # two different domains: their vocabularies differ a lot
    assert len(a & b) / len(a | b) < 0.3



def test_every_set_is_the_eval_split_then_the_named_sets(tiny_data_dir, tiny_tokenizer):
    sets = load_recipe(ROOT / "params.yaml").evaluation.sets
    windows = every_set(sets, tiny_data_dir, tiny_tokenizer, ROOT)
    assert list(windows) == ["eval", *sets]
    assert torch.equal(windows["eval"], load_windows(tiny_data_dir, "eval"))
    for name, spec in sets.items():
        assert torch.equal(windows[name], set_windows(name, spec, tiny_data_dir, tiny_tokenizer, ROOT))

def test_domain_sources_are_named():
    readme = (ROOT / "evals" / "domains" / "README.md").read_text()
    for name in load_recipe(ROOT / "params.yaml").evaluation.sets:
        assert f"`{name}`" in readme
    for path in (ROOT / "evals" / "domains").rglob("*.txt"):
        assert path.name in readme, path


# --------------------------------------------------------------------------- the gate
def test_ppl_gate_applies_to_every_set_and_the_worst_decides():
    gates = GatesConfig(max_ppl_increase_pct=10.0, min_size_reduction=None)
    # in-domain +5% passes, fiction +15% fails, legal +2.5%
    cand = {"ppl": 10.5, "ppl.fiction": 23.0, "ppl.legal": 8.2, "size_mb": 100.0, "decode_tps": 20.0}
    v = verdict(cand, BASE, gates, None, "ppl")
    g = v["gates"][0]
    assert not v["passed"] and g["name"] == "ppl_increase_pct" and g["status"] == "fail"
    assert g["worst"] == "ppl.fiction" and g["metric"] == "ppl.fiction" and g["value"] == pytest.approx(15.0)
    assert g["per_set"] == pytest.approx({"ppl": 5.0, "ppl.fiction": 15.0, "ppl.legal": 2.5})
    assert v["reasons"] == ["ppl_increase_pct = 15.0 on ppl.fiction fails <= 10.0"]
    line = describe(g)
    assert "on ppl.fiction <= 10: FAIL" in line and line.endswith("ppl.legal +2.50]")
    # the same candidate passes once every set is within the limit
    ok = verdict({**cand, "ppl.fiction": 21.0}, BASE, gates, None, "ppl")
    assert ok["passed"] and ok["gates"][0]["worst"] == "ppl" and ok["gates"][0]["value"] == pytest.approx(5.0)


def test_ppl_gate_missing_sets():
    gates = GatesConfig(max_ppl_increase_pct=10.0, min_size_reduction=None)
    # the candidate lacks a set the base model was measured on: the gate fails and says so
    v = verdict({"ppl": 10.1, "ppl.fiction": 20.0}, BASE, gates, None, "ppl")
    assert not v["passed"] and v["gates"][0]["worst"] == "ppl.legal"
    assert v["reasons"] == ["ppl_increase_pct: the candidate has no ppl.legal"]
    # a set the base model lacks is left out of the judgement and named
    v = verdict({"ppl": 10.1, "ppl.fiction": 20.0, "ppl.legal": 8.0, "ppl.new": 99.0}, BASE, gates, None, "ppl")
    g = v["gates"][0]
    assert v["passed"] and g["per_set"]["ppl.new"] is None and "ppl.new" in g["reason"]
    # no named sets: the gate is the primary set's, as before
    v = verdict({"ppl": 12.0}, {"ppl": 10.0}, gates, None, "ppl")
    assert v["gates"][0]["value"] == pytest.approx(20.0) and "per_set" not in v["gates"][0]


def test_decode_speedup_gate_uses_the_base_raced_in_the_same_evaluation():
    gates = GatesConfig(max_ppl_increase_pct=None, min_size_reduction=None, min_decode_speedup=2.0)
    cached_base = {**BASE, "decode_tps": 5.0}  # a figure from another hour: would give 4x
    cand = {"ppl": 10.0, "decode_tps": 20.0, "base_decode_tps": 12.5}
    g = verdict(cand, cached_base, gates, None, "ppl")["gates"][0]
    assert g["value"] == pytest.approx(1.6) and g["status"] == "fail"
    assert g["reference"] == "base model, interleaved in the same evaluation"
    g = verdict({"ppl": 10.0, "decode_tps": 20.0}, cached_base, gates, None, "ppl")["gates"][0]
    assert g["value"] == pytest.approx(4.0) and g["status"] == "pass" and g["reference"] == "baseline evaluation"


# --------------------------------------------------------------------------- the race
def test_decode_race_measures_both_models_interleaved(tiny_model_dir, capsys):
    result = decode_race(tiny_model_dir, tiny_model_dir, "def f(x):", rounds=2, new_tokens=4)
    assert set(result) == {"decode_tps", "base_decode_tps", "decode_speedup", "decode_race_rounds"}
    assert result["decode_tps"] > 0 and result["base_decode_tps"] > 0 and result["decode_race_rounds"] == 2
    assert result["decode_speedup"] == pytest.approx(result["decode_tps"] / result["base_decode_tps"])
    rounds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("decode round")]
    assert len(rounds) == 2 and all("base" in r and "candidate" in r for r in rounds)
    with pytest.raises(ValueError, match="decode_race_rounds"):
        decode_race(tiny_model_dir, tiny_model_dir, "x", rounds=0)


# --------------------------------------------------------------------------- the report
def test_report_shows_the_sets_side_by_side():
    gates = GatesConfig(max_ppl_increase_pct=10.0, min_size_reduction=None)
    cand = {"ppl": 10.5, "ppl.fiction": 23.0, "ppl.legal": 8.2, "eval_windows": 24, "windows.fiction": 20,
            "windows.legal": 20, "size_mb": 100.0, "decode_tps": 30.0, "base_decode_tps": 12.0}
    v = verdict(cand, BASE, gates, None, "ppl")
    report = build_report("r", BASE, cand, [], v, {"git_commit": "a" * 40, "dvc": {}})
    title, headers, rows, marked = sets_section(report)
    assert "at most +10% on each" in title and headers[:2] == ["set", "windows"]
    assert [r[0] for r in rows] == ["eval (prepared split)", "fiction (worst)", "legal"]
    assert rows[1][1:] == ["20", "20.000", "23.000", "+15.00%"] and marked == [1]
    md = to_markdown(report)
    assert "## Perplexity by set" in md and "| **fiction (worst)** |" in md
    assert "| decode tokens/s (raced in this evaluation) | 12.0 | 30.0 | 2.500 |" in md
    assert "ppl_increase_pct (worst: ppl.fiction)" in md
    assert "Perplexity by set" in summary_markdown(report) and "fiction (worst)" in to_html(report)
    # a run with the primary set only has no such section
    plain = build_report("r", {"ppl": 10.0}, {"ppl": 11.0}, [], verdict({"ppl": 11.0}, {"ppl": 10.0}, gates, None,
                                                                         "ppl"), {"git_commit": "a", "dvc": {}})
    assert sets_section(plain) is None and "Perplexity by set" not in to_markdown(plain)


def test_params_yaml_keeps_the_race_on():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["evaluation"]["decode_race_rounds"] >= 3


# --------------------------------------------------------------------------- languages
def test_the_default_recipe_evaluates_three_languages_in_two_scripts(smollm2_base):
    """French, German and Russian (Latin and Cyrillic; Romance, Germanic, Slavic), each at least 20
    windows of SmolLM2's 512 tokens, none of it English, and none of it in the calibration text
    that data.calib_mix can add (a different document in the same languages)."""
    import re

    from frugalflow.models import load_tokenizer

    recipe = load_recipe(ROOT / "params.yaml")
    tokenizer = load_tokenizer(smollm2_base)
    english = set("the and of to is are that this with for you your be can not which".split())
    scripts = {}
    for name in ("french", "german", "russian"):
        spec = recipe.evaluation.sets[name]
        assert spec.max_windows >= 20
        files = resolve_files(name, spec.text_files, ROOT)
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert len(ids) // recipe.data.window >= 20, (name, len(ids))
        words = re.findall(r"[a-zA-Z']+", text.lower())
        assert sum(w in english for w in words) / len(text.split()) < 0.02, name
        scripts[name] = "cyrillic" if len(re.findall("[а-яА-Я]", text)) > len(text) / 3 else "latin"
        calibration = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "corpora").rglob("*.txt"))
        probes = [text[i:i + 100] for i in range(0, len(text) - 100, len(text) // 50)]
        assert not any(p in calibration for p in probes), name
    assert scripts == {"french": "latin", "german": "latin", "russian": "cyrillic"}
