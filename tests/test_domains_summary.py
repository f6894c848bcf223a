"""benchmarks/domains.py's table over seeds: medians per setting, and TSLD paired with KL only where the
two runs differ in nothing but the loss (same data, steps, cross-entropy term, seed, stages before)."""
from __future__ import annotations

import importlib.util

from helpers import ROOT

SPEC = importlib.util.spec_from_file_location("domains_benchmark", ROOT / "benchmarks" / "domains.py")
domains = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(domains)

NAMES = ["eval", "legal"]


def run(method: str, seed: int, after: dict[str, float], before: float = 12.0, **distill) -> dict:
    d = {"method": method, "steps": 180, "lr": 1.5e-4, "ce_weight": 0.0, **distill}
    if method == "tsld":
        d = {"tau": 10.0, "scale_by": "target", **d}
    sets = {n: {"base_ppl": 10.0, "before_ppl": before, "after_ppl": after[n], "change_pct": (after[n] / 10 - 1) * 100,
                "gap_closed_pct": round((before - after[n]) / (before - 10) * 100, 1)} for n in NAMES}
    return {"variant": "default", "quantization": "w4 g64", "distill": d, "seed": seed, "sets": sets,
            "machine": "m", "model": f"{seed}-{method}-{after['eval']}"}


def summary_rows(entries: list[dict]) -> list[list[str]]:
    lines = domains.seed_summary(entries, NAMES)
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| default")]


def test_tsld_pairs_with_kl_seed_by_seed_and_counts_the_seeds_it_is_at_least_as_good():
    entries = [run("tsld", 0, {"eval": 10.30, "legal": 10.50}), run("kl", 0, {"eval": 10.20, "legal": 10.60}),
               run("tsld", 1, {"eval": 10.40, "legal": 10.40}), run("kl", 1, {"eval": 10.40, "legal": 10.70}),
               run("tsld", 2, {"eval": 10.10, "legal": 10.45}), run("kl", 2, {"eval": 10.50, "legal": 10.50})]
    tsld, kl = summary_rows(entries)
    assert tsld[2] == "0, 1, 2" and tsld[3] == "+3.00" and tsld[4] == "+4.50"  # medians of the changes
    assert tsld[5] == "85.0" and tsld[6] == "77.5"  # medians of the gap closed
    # eval: behind at seed 0, level at 1, ahead at 2; every sign pattern is as far from 0 as the observed mean
    assert tsld[7] == "+0.00 (+1.00 +0.00 -4.00); 2 of 3; mean -1.00, p 1"
    assert tsld[8] == "-1.00 (-1.00 -3.00 -0.50); 3 of 3; mean -1.50, p 0.25"  # only all-minus and all-plus
    assert kl[0] == "default" and kl[7:9] == ["-", "-"]


def test_runs_that_differ_in_more_than_the_loss_are_not_paired():
    ce = run("tsld", 0, {"eval": 10.1, "legal": 10.1}, ce_weight=0.5)
    entries = [ce, {**ce, "seed": 1, "model": "x"},
               run("kl", 0, {"eval": 10.9, "legal": 10.9}), run("kl", 1, {"eval": 10.9, "legal": 10.9}),
               run("tsld", 0, {"eval": 10.1, "legal": 10.1}, before=13.0),  # other stages before distillation
               run("tsld", 1, {"eval": 10.1, "legal": 10.1}, before=13.0)]
    rows = summary_rows(entries)
    tsld_ce = next(r for r in rows if "cross-entropy" in r[1])
    other_before = next(r for r in rows if r[1].startswith("tsld") and "cross-entropy" not in r[1])
    assert tsld_ce[7] == "-" and other_before[7] == "-"
    assert sum(r[1].startswith("kl") for r in rows) == 1


def test_a_tsld_only_setting_does_not_split_the_kl_pairing():
    """tau and the token score are TSLD's own: every TSLD setting pairs with the same KL runs."""
    entries = [run("kl", s, {"eval": 10.5, "legal": 10.5}) for s in (0, 1)]
    entries += [run("tsld", s, {"eval": 10.4, "legal": 10.6}, tau=3.0, scale_by="entropy") for s in (0, 1)]
    tsld = next(r for r in summary_rows(entries) if r[1].startswith("tsld"))
    assert "tau 3, scored by entropy" in tsld[1]
    assert tsld[7] == "-1.00 (-1.00 -1.00); 2 of 2; mean -1.00, p 0.5"
    assert tsld[8] == "+1.00 (+1.00 +1.00); 0 of 2; mean +1.00, p 0.5"
