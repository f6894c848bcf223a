"""Gate verdicts against the baseline, the champion and absolute limits; ranking on an objective."""
from __future__ import annotations

import pytest

from frugalflow.config import GatesConfig, RecipeError
from frugalflow.gates import beats, check_gates, describe, lower_is_better, rank, verdict
from frugalflow.recipe_io import recipe_from_dict

BASE = {"ppl": 10.0, "size_mb": 400.0, "decode_tps": 20.0}


def test_passing_candidate_lists_every_gate():
    gates = GatesConfig(max_ppl_increase_pct=20, min_size_reduction=3, min_decode_speedup=1.2, max_ppl=12)
    v = verdict({"ppl": 11.0, "size_mb": 100.0, "decode_tps": 30.0}, BASE, gates, None, "ppl")
    assert v["passed"] and v["reasons"] == []
    assert {g["name"] for g in v["gates"]} == {"ppl_increase_pct", "size_reduction", "decode_speedup", "ppl"}
    by_name = {g["name"]: g for g in v["gates"]}
    assert abs(by_name["ppl_increase_pct"]["value"] - 10.0) < 1e-9 and by_name["size_reduction"]["value"] == 4.0
    assert v["beats_champion"]


def test_failing_gates_give_reasons():
    gates = GatesConfig(max_ppl_increase_pct=5, min_size_reduction=5)
    v = verdict({"ppl": 11.0, "size_mb": 100.0, "decode_tps": 30.0}, BASE, gates, None, "ppl")
    assert not v["passed"]
    assert len(v["reasons"]) == 2 and "ppl_increase_pct" in v["reasons"][0] and "size_reduction" in v["reasons"][1]


def test_champion_comparison_follows_objective():
    champ = {"ppl": 11.0, "size_mb": 90.0, "decode_tps": 40.0}
    cand = {"ppl": 10.5, "size_mb": 100.0, "decode_tps": 30.0}
    assert beats(cand, champ, "ppl")
    assert not beats(cand, champ, "size_mb")
    assert not beats(cand, champ, "decode_tps")
    assert beats(cand, None, "decode_tps")


# --------------------------------------------------------------------------- champion, absolute, rank
CAND = {"ppl": 11.0, "size_mb": 100.0, "decode_tps": 30.0, "ppl.notes": 20.0, "lm_eval.pydoc_mc.acc": 0.4}
VS_CHAMP = GatesConfig(max_ppl_increase_pct=None, min_size_reduction=None, max_ppl_increase_vs_champion_pct=5.0,
                       min_decode_speedup_vs_champion=1.1, max_size_ratio_vs_champion=1.0)


def _by_name(v):
    return {g["name"]: g for g in v["gates"]}


def test_champion_gates_pass_fail_and_skip():
    good = {"ppl": 10.8, "size_mb": 120.0, "decode_tps": 25.0}  # cand: +1.85% ppl, 1.2x speed, 0.83x size
    v = verdict(CAND, BASE, VS_CHAMP, good, "ppl")
    g = _by_name(v)
    assert v["passed"] and [x["status"] for x in v["gates"]] == ["pass"] * 3
    assert g["ppl_increase_vs_champion_pct"]["value"] == pytest.approx(1.8519, abs=1e-4)
    assert g["decode_speedup_vs_champion"]["value"] == 1.2 and g["size_ratio_vs_champion"]["value"] == 0.8333
    assert all(x["kind"] == "champion" for x in v["gates"]) and not v["beats_champion"]

    strong = {"ppl": 10.0, "size_mb": 90.0, "decode_tps": 30.0}  # +10% ppl, 1.0x speed, 1.11x size: all fail
    v = verdict(CAND, BASE, VS_CHAMP, strong, "ppl")
    assert not v["passed"] and [x["status"] for x in v["gates"]] == ["fail"] * 3 and len(v["reasons"]) == 3
    assert v["reasons"][0] == "ppl_increase_vs_champion_pct = 10.0 fails <= 5.0"

    v = verdict(CAND, BASE, VS_CHAMP, None, "ppl")  # no champion: reported as skipped, not failed
    assert v["passed"] and v["reasons"] == [] and v["beats_champion"]
    assert [x["status"] for x in v["gates"]] == ["skipped"] * 3
    assert all(x["passed"] is None and x["value"] is None and x["reason"] == "no champion to compare with"
               for x in v["gates"])
    assert v["skipped"][0] == "ppl_increase_vs_champion_pct: no champion to compare with"
    assert describe(v["gates"][0]).endswith("SKIPPED (no champion to compare with)")

    v = verdict(CAND, BASE, VS_CHAMP, {"ppl": 10.8, "version": "3"}, "ppl")  # champion lacks a metric
    assert [x["status"] for x in v["gates"]] == ["pass", "skipped", "skipped"]
    assert _by_name(v)["decode_speedup_vs_champion"]["reason"] == "the champion has no decode_tps"


def test_absolute_limits_and_metric_gates():
    gates = GatesConfig(max_ppl_increase_pct=None, min_size_reduction=None, max_ppl=12, max_size_mb=99,
                        min_decode_tps=30, min_metrics={"lm_eval.pydoc_mc.acc": 0.5, "lm_eval.other.acc": 0.1},
                        max_metrics={"ppl.notes": 25})
    v = verdict(CAND, BASE, gates, None, "ppl")
    g = _by_name(v)
    assert list(g) == ["ppl", "size_mb", "decode_tps", "min.lm_eval.other.acc", "min.lm_eval.pydoc_mc.acc",
                       "max.ppl.notes"]
    assert {k: x["status"] for k, x in g.items()} == {
        "ppl": "pass", "size_mb": "fail", "decode_tps": "pass", "min.lm_eval.other.acc": "fail",
        "min.lm_eval.pydoc_mc.acc": "fail", "max.ppl.notes": "pass"}
    assert all(x["kind"] == "absolute" for x in v["gates"])
    assert g["min.lm_eval.other.acc"]["value"] is None  # not measured: fails, since the recipe asked for it
    assert "min.lm_eval.other.acc: the candidate has no lm_eval.other.acc (is it evaluated?)" in v["reasons"]
    assert not v["passed"] and len(v["reasons"]) == 3


def test_default_gates_unchanged():
    assert [g["name"] for g in check_gates(CAND, BASE, GatesConfig())] == ["ppl_increase_pct", "size_reduction"]
    recipe = recipe_from_dict({"stages": [{"method": "rtn"}]})
    assert recipe.gates.max_ppl_increase_vs_champion_pct is None and recipe.gates.min_metrics is None


def test_rank_orders_by_objective_direction():
    cands = [{"id": "a", "ppl": 12.0, "decode_tps": 30.0, "lm_eval.t.acc": 0.3, "ppl.notes": 9.0},
             {"id": "b", "ppl": 10.0, "decode_tps": 20.0, "ppl.notes": float("nan")},
             {"id": "c", "ppl": 11.0, "decode_tps": 40.0, "lm_eval.t.acc": 0.5, "ppl.notes": 8.0},
             {"id": "d", "ppl": 10.0, "decode_tps": 25.0, "lm_eval.t.acc": 0.3}]
    ids = lambda objective: [c["id"] for c in rank(cands, objective)]  # noqa: E731
    assert ids("ppl") == ["b", "d", "c", "a"]  # lower first; the tie keeps input order
    assert ids("decode_tps") == ["c", "a", "d", "b"]  # higher first
    assert ids("lm_eval.t.acc") == ["c", "a", "d", "b"]  # missing last
    assert ids("ppl.notes") == ["c", "a", "b", "d"]  # NaN and missing last, in input order
    assert rank(cands, "ppl")[0] is cands[1] and rank([], "ppl") == []
    assert lower_is_better("lm_eval.wikitext.word_perplexity") and not lower_is_better("lm_eval.t.acc_norm")


def test_beats_on_named_set_and_lm_eval_objectives():
    assert beats({"ppl.notes": 8.0}, {"ppl.notes": 9.0}, "ppl.notes")
    assert not beats({"lm_eval.t.acc": 0.3}, {"lm_eval.t.acc": 0.4}, "lm_eval.t.acc")
    assert beats({"lm_eval.t.acc": 0.3}, {"ppl": 9.0}, "lm_eval.t.acc")  # the champion never measured it
    assert not beats({"ppl": 9.0}, {"lm_eval.t.acc": 0.4}, "lm_eval.t.acc")  # the candidate did not


def test_objective_names_are_validated():
    for good in ("ppl", "decode_tps", "ppl.notes", "lm_eval.pydoc_mc.acc", "lm_eval.gsm8k.exact_match.strict-match"):
        assert recipe_from_dict({"stages": [{"method": "rtn"}], "registry": {"objective": good}}).registry.objective
    for bad in ("speed", "ppl.", "lm_eval.acc"):
        with pytest.raises(RecipeError, match="registry.objective"):
            recipe_from_dict({"stages": [{"method": "rtn"}], "registry": {"objective": bad}})
