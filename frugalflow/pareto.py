"""Pareto fronts over candidates described by named metrics.

A candidate dominates another when it is at least as good on every metric (lower for the
`minimize` names, higher for the `maximize` names) and strictly better on at least one.
The front is the set of candidates nothing dominates; equal candidates do not dominate
each other, so ties are all on the front. A candidate missing a metric, or holding a
non-number or NaN there, takes no part: it is never on the front and dominates nothing.

    pareto_front(runs, minimize=("ppl", "size_mb"))                         # ppl vs size
    pareto_front(runs, minimize=("ppl",), maximize=("decode_tps",))         # ppl vs speed
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def _value(point: Mapping, name: str) -> float | None:
    value = point.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _costs(point: Mapping, minimize: Sequence[str], maximize: Sequence[str]) -> tuple[float, ...] | None:
    """The metrics as costs (lower is better), or None when one is missing."""
    values = [_value(point, n) for n in minimize] + [_value(point, n) for n in maximize]
    if any(v is None for v in values):
        return None
    return tuple(values[:len(minimize)]) + tuple(-v for v in values[len(minimize):])


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """True when cost vector `a` is no worse than `b` everywhere and better somewhere."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Mapping], minimize: Sequence[str] = (), maximize: Sequence[str] = ()) -> list[int]:
    """Indices (ascending) of the non-dominated points; see the module docstring."""
    minimize, maximize = tuple(minimize), tuple(maximize)
    if not minimize and not maximize:
        raise ValueError("pareto_front: name at least one metric to minimize or maximize")
    both = set(minimize) & set(maximize)
    if both:
        raise ValueError(f"pareto_front: {sorted(both)} both minimized and maximized")
    costs = [_costs(p, minimize, maximize) for p in points]
    valid = [(i, c) for i, c in enumerate(costs) if c is not None]
    return [i for i, c in valid if not any(dominates(other, c) for j, other in valid if j != i)]
