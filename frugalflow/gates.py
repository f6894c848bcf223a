"""Verdicts: a candidate's metrics against the base model, the current champion and absolute
limits; ranking candidates on a named objective.

Metrics are plain dicts (`ppl`, `size_mb`, `decode_tps`, `ppl.<set>`, `lm_eval.<task>.<metric>`,
...). The verdict lists every configured gate with its kind (baseline | champion | absolute),
value, threshold, rule and status: `pass`, `fail`, or `skipped` with the reason (a champion
gate when there is no champion, or the champion lacks the metric). Skipped gates do not fail
the verdict; a gate whose metric the candidate lacks fails, since the recipe asked for it.

The baseline perplexity gate (`ppl_increase_pct`) applies to every perplexity set the base
model was measured on (`ppl` and each `ppl.<set>`): its value is the worst set's increase,
named in `metric`/`worst`, with every set's increase under `per_set`. The decode-speed gate
compares with the base model's speed measured interleaved in the candidate's own evaluation
(`base_decode_tps`) when the candidate carries it, else with the baseline evaluation's figure.
"""
from __future__ import annotations

import math

from frugalflow.config import GatesConfig

# objective -> True when lower is better (the named ones; see lower_is_better for the rest)
OBJECTIVES = {"ppl": True, "size_mb": True, "decode_tps": False, "prefill_tps": False, "latency_p50_ms": True,
              "latency_p95_ms": True, "peak_mem_mb": True}


def lower_is_better(metric: str) -> bool:
    """Direction of a metric: the named ones, `ppl.<set>` (lower), `lm_eval.<task>.<metric>`
    (higher, except perplexities, bits per byte and TER)."""
    if metric in OBJECTIVES:
        return OBJECTIVES[metric]
    if metric.startswith("ppl."):
        return True
    if metric.startswith("lm_eval."):
        name = metric.split(".")[2] if metric.count(".") >= 2 else metric
        return name in ("bits_per_byte", "ter") or name.endswith("perplexity")
    raise ValueError(f"unknown objective {metric!r}: use one of {', '.join(OBJECTIVES)}, ppl.<set> or "
                     "lm_eval.<task>.<metric>")


def objective_value(metrics: dict | None, objective: str) -> float | None:
    """The metric as a float, or None when it is missing or not a finite number."""
    value = (metrics or {}).get(objective)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def rank(candidates: list[dict], objective: str) -> list[dict]:
    """The candidates (metric dicts, extra keys kept) best first on `objective`; ties keep their
    order, candidates without the metric come last in their input order."""
    lower = lower_is_better(objective)
    have = [c for c in candidates if objective_value(c, objective) is not None]
    lacking = [c for c in candidates if objective_value(c, objective) is None]
    have.sort(key=lambda c: objective_value(c, objective) * (1 if lower else -1))
    return have + lacking


def beats(candidate: dict, champion: dict | None, objective: str) -> bool:
    """True when there is no champion (or it lacks the objective) or the candidate is strictly
    better on it; False when the candidate lacks it."""
    mine, theirs = objective_value(candidate, objective), objective_value(champion, objective)
    if champion is None or theirs is None:
        return True
    if mine is None:
        return False
    return mine < theirs if lower_is_better(objective) else mine > theirs


# --------------------------------------------------------------------------- gates
def _record(name: str, kind: str, metric: str, value: float | None, threshold: float, rule: str,
            reason: str | None = None, skip: bool = False) -> dict:
    if skip:
        status, passed = "skipped", None
    elif value is None:
        status, passed = "fail", False
    else:
        passed = value <= threshold if rule == "<=" else value >= threshold
        status = "pass" if passed else "fail"
    return {"name": name, "kind": kind, "metric": metric, "value": None if value is None else round(value, 4),
            "threshold": threshold, "rule": rule, "passed": passed, "status": status, "reason": reason}


def _relative(name: str, kind: str, metric: str, candidate: dict, ref: dict | None, threshold: float, rule: str,
              how: str) -> dict:
    """A gate on candidate vs reference: how = 'increase_pct' | 'ratio' | 'inverse_ratio'."""
    mine, theirs = objective_value(candidate, metric), objective_value(ref, metric)
    if ref is None:
        return _record(name, kind, metric, None, threshold, rule, f"no {kind} to compare with", skip=True)
    if theirs is None or theirs == 0:
        return _record(name, kind, metric, None, threshold, rule, f"the {kind} has no {metric}", skip=True)
    if mine is None:
        return _record(name, kind, metric, None, threshold, rule, f"the candidate has no {metric}")
    value = {"increase_pct": (mine / theirs - 1.0) * 100.0, "ratio": mine / theirs,
             "inverse_ratio": theirs / mine if mine else math.inf}[how]
    return _record(name, kind, metric, value, threshold, rule)


def _absolute(name: str, metric: str, candidate: dict, threshold: float, rule: str) -> dict:
    value = objective_value(candidate, metric)
    reason = None if value is not None else f"the candidate has no {metric} (is it evaluated?)"
    return _record(name, "absolute", metric, value, threshold, rule, reason)


def ppl_sets(candidate: dict, baseline: dict | None) -> list[str]:
    """`ppl` and every `ppl.<set>` metric of either side: the primary set first, then by name."""
    named = {k for k in (*candidate, *(baseline or {})) if k.startswith("ppl.")}
    return ["ppl", *sorted(named)]


def worst_ppl_increase(candidate: dict, baseline: dict | None, threshold: float) -> dict:
    """The baseline perplexity gate over every set: the worst set's increase decides. A set the
    base model lacks is left out (listed as None); one the candidate lacks fails the gate."""
    sets = ppl_sets(candidate, baseline)
    per = {m: _relative("ppl_increase_pct", "baseline", m, candidate, baseline, threshold, "<=", "increase_pct")
           for m in sets}
    if len(sets) == 1:
        return per["ppl"]
    judged = {m: r for m, r in per.items() if r["status"] != "skipped"}
    if not judged:
        return {**per["ppl"], "per_set": {m: None for m in sets}}
    missing = [m for m, r in judged.items() if r["value"] is None]
    if missing:
        worst = missing[0]
    else:
        worst = max(judged, key=lambda m: judged[m]["value"])
    record = {**judged[worst], "worst": worst,
              "per_set": {m: per[m]["value"] if per[m]["status"] != "skipped" else None for m in sets}}
    skipped = [m for m in sets if per[m]["status"] == "skipped"]
    if skipped and record["reason"] is None:
        record["reason"] = f"not measured on the base model: {', '.join(skipped)}"
    return record


def decode_speedup(candidate: dict, baseline: dict, threshold: float) -> dict:
    """Candidate decode tokens/s over the base model's: the base figure measured interleaved in
    the candidate's evaluation (`base_decode_tps`) when there is one, else the baseline's."""
    same_run = objective_value(candidate, "base_decode_tps")
    ref = {"decode_tps": same_run} if same_run is not None else baseline
    record = _relative("decode_speedup", "baseline", "decode_tps", candidate, ref, threshold, ">=", "ratio")
    record["reference"] = ("base model, interleaved in the same evaluation" if same_run is not None
                           else "baseline evaluation")
    return record


def check_gates(candidate: dict, baseline: dict, gates: GatesConfig, champion: dict | None = None) -> list[dict]:
    """Every configured gate, in a fixed order: baseline, champion, absolute."""
    g, out = gates, []
    if g.max_ppl_increase_pct is not None:
        out.append(worst_ppl_increase(candidate, baseline, g.max_ppl_increase_pct))
    if g.min_size_reduction is not None:
        out.append(_relative("size_reduction", "baseline", "size_mb", candidate, baseline, g.min_size_reduction,
                             ">=", "inverse_ratio"))
    if g.min_decode_speedup is not None:
        out.append(decode_speedup(candidate, baseline, g.min_decode_speedup))
    if g.max_ppl_increase_vs_champion_pct is not None:
        out.append(_relative("ppl_increase_vs_champion_pct", "champion", "ppl", candidate, champion,
                             g.max_ppl_increase_vs_champion_pct, "<=", "increase_pct"))
    if g.min_decode_speedup_vs_champion is not None:
        out.append(_relative("decode_speedup_vs_champion", "champion", "decode_tps", candidate, champion,
                             g.min_decode_speedup_vs_champion, ">=", "ratio"))
    if g.max_size_ratio_vs_champion is not None:
        out.append(_relative("size_ratio_vs_champion", "champion", "size_mb", candidate, champion,
                             g.max_size_ratio_vs_champion, "<=", "ratio"))
    if g.max_ppl is not None:
        out.append(_absolute("ppl", "ppl", candidate, g.max_ppl, "<="))
    if g.max_size_mb is not None:
        out.append(_absolute("size_mb", "size_mb", candidate, g.max_size_mb, "<="))
    if g.min_decode_tps is not None:
        out.append(_absolute("decode_tps", "decode_tps", candidate, g.min_decode_tps, ">="))
    for metric, threshold in sorted((g.min_metrics or {}).items()):
        out.append(_absolute(f"min.{metric}", metric, candidate, threshold, ">="))
    for metric, threshold in sorted((g.max_metrics or {}).items()):
        out.append(_absolute(f"max.{metric}", metric, candidate, threshold, "<="))
    return out


def describe(gate: dict) -> str:
    """One line: `name = value <rule> threshold: PASS|FAIL|skipped (reason)`."""
    value = "-" if gate["value"] is None else f"{gate['value']:.4g}"
    where = f" on {gate['worst']}" if gate.get("worst") else ""
    line = f"{gate['name']} = {value}{where} {gate['rule']} {gate['threshold']:g}: {gate['status'].upper()}"
    if gate.get("per_set"):
        line += " [" + ", ".join(f"{m} {'-' if v is None else f'{v:+.2f}'}" for m, v in gate["per_set"].items()) + "]"
    return line + (f" ({gate['reason']})" if gate.get("reason") else "")


def verdict(candidate: dict, baseline: dict, gates: GatesConfig, champion: dict | None, objective: str) -> dict:
    results = check_gates(candidate, baseline, gates, champion)
    failed = [g for g in results if g["status"] == "fail"]
    reasons = [f"{g['name']} = {g['value']}{' on ' + g['worst'] if g.get('worst') else ''} fails {g['rule']} "
               f"{g['threshold']}" if g["value"] is not None else f"{g['name']}: {g['reason']}" for g in failed]
    return {
        "passed": not failed,
        "gates": results,
        "reasons": reasons,
        "skipped": [f"{g['name']}: {g['reason']}" for g in results if g["status"] == "skipped"],
        "objective": objective,
        "objective_value": objective_value(candidate, objective),
        "beats_champion": beats(candidate, champion, objective),
        "champion": champion,
    }
