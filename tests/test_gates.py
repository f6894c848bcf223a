"""Gate verdicts against the baseline and the champion."""
from __future__ import annotations

from frugalflow.config import GatesConfig
from frugalflow.gates import beats, verdict

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
