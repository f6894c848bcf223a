"""Where a new champion is worse than the champion it replaced.

A champion is promoted for beating the previous one on the registry's objective; it may still be worse
on another metric both recorded (a perplexity set, the size, the decode speed-up against the base model).
`regressions` lists every shared metric on which the new one is worse by more than its tolerance, in
percent of the previous value: `tolerances` maps a metric to a percentage, and `ppl` covers every
`ppl.<set>` that has no entry of its own. Metrics without a tolerance are not compared.

Directions come from frugalflow/gates.py (`lower_is_better`); `decode_speedup` (the candidate's decode
speed over the base model's, raced in the same evaluation) is higher-is-better and, unlike `decode_tps`,
comparable between nights on different hosts.
"""
from __future__ import annotations

from frugalflow.gates import lower_is_better, objective_value

HIGHER = ("decode_speedup",)


def tolerance(metric: str, tolerances: dict[str, float]) -> float | None:
    """The metric's own tolerance, else `ppl`'s for a perplexity set, else None (not compared)."""
    if metric in tolerances:
        return float(tolerances[metric])
    if metric.startswith("ppl.") and "ppl" in tolerances:
        return float(tolerances["ppl"])
    return None


def worse_pct(metric: str, new: float, old: float) -> float:
    """How much worse `new` is than `old`, in percent of `old` (negative when better)."""
    lower = metric not in HIGHER and lower_is_better(metric)
    return (new / old - 1.0) * 100.0 if lower else (1.0 - new / old) * 100.0


def regressions(new: dict, old: dict, tolerances: dict[str, float]) -> list[dict]:
    """[{metric, old, new, worse_pct, tolerance_pct}] for each metric both hold on which `new` is worse
    than `old` by more than its tolerance; the worst first."""
    found = []
    for metric in sorted(set(new) & set(old)):
        limit = tolerance(metric, tolerances)
        mine, theirs = objective_value(new, metric), objective_value(old, metric)
        if limit is None or mine is None or theirs is None or theirs == 0:
            continue
        pct = worse_pct(metric, mine, theirs)
        if pct > limit:
            found.append({"metric": metric, "old": theirs, "new": mine, "worse_pct": round(pct, 3),
                          "tolerance_pct": limit})
    return sorted(found, key=lambda r: -r["worse_pct"])


def describe(found: dict) -> str:
    """`ppl.german 20.1 -> 21.3 (+6.0% worse; tolerance 2%)`."""
    return (f"{found['metric']} {found['old']:.4g} -> {found['new']:.4g} ({found['worse_pct']:+.1f}% worse; "
            f"tolerance {found['tolerance_pct']:g}%)")
