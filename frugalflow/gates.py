"""Verdicts: a candidate's metrics against the base model, absolute limits and the champion.

Metrics are plain dicts with at least `ppl`, `size_mb` and `decode_tps`. The verdict
lists every gate with its value, threshold and result, so a failing candidate carries
its reasons.
"""
from __future__ import annotations

from frugalflow.config import GatesConfig

# objective -> True when lower is better
OBJECTIVES = {"ppl": True, "size_mb": True, "decode_tps": False}


def _gate(name: str, value: float, threshold: float, ok: bool, rule: str) -> dict:
    return {"name": name, "value": round(value, 4), "threshold": threshold, "passed": ok, "rule": rule}


def check_gates(candidate: dict, baseline: dict, gates: GatesConfig) -> list[dict]:
    out = []
    if gates.max_ppl_increase_pct is not None:
        inc = (candidate["ppl"] / baseline["ppl"] - 1.0) * 100.0
        out.append(_gate("ppl_increase_pct", inc, gates.max_ppl_increase_pct,
                         inc <= gates.max_ppl_increase_pct, "<="))
    if gates.min_size_reduction is not None:
        red = baseline["size_mb"] / candidate["size_mb"]
        out.append(_gate("size_reduction", red, gates.min_size_reduction, red >= gates.min_size_reduction, ">="))
    if gates.min_decode_speedup is not None:
        spd = candidate["decode_tps"] / baseline["decode_tps"]
        out.append(_gate("decode_speedup", spd, gates.min_decode_speedup, spd >= gates.min_decode_speedup, ">="))
    if gates.max_ppl is not None:
        out.append(_gate("ppl", candidate["ppl"], gates.max_ppl, candidate["ppl"] <= gates.max_ppl, "<="))
    return out


def beats(candidate: dict, champion: dict | None, objective: str) -> bool:
    """True when there is no champion or the candidate is strictly better on the objective."""
    if champion is None or objective not in champion:
        return True
    lower_better = OBJECTIVES[objective]
    return candidate[objective] < champion[objective] if lower_better else candidate[objective] > champion[objective]


def verdict(candidate: dict, baseline: dict, gates: GatesConfig, champion: dict | None, objective: str) -> dict:
    results = check_gates(candidate, baseline, gates)
    failed = [g for g in results if not g["passed"]]
    reasons = [f"{g['name']} = {g['value']} fails {g['rule']} {g['threshold']}" for g in failed]
    return {
        "passed": not failed,
        "gates": results,
        "reasons": reasons,
        "objective": objective,
        "beats_champion": beats(candidate, champion, objective),
        "champion": champion,
    }
