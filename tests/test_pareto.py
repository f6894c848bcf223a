"""Pareto fronts: hand-made fronts, ties, maximize vs minimize, missing metrics, and a
sort-and-sweep reference on random 2-D points."""
from __future__ import annotations

import random

import pytest

from frugalflow.pareto import dominates, pareto_front


def pts(*pairs, names=("ppl", "size_mb")):
    return [dict(zip(names, p)) for p in pairs]


def test_known_front_both_minimized():
    points = pts((1, 5), (2, 3), (3, 4), (4, 1), (5, 1), (2.5, 3))
    # (3,4) is dominated by (2,3); (5,1) by (4,1) (equal size, worse ppl); (2.5,3) by (2,3)
    assert pareto_front(points, minimize=("ppl", "size_mb")) == [0, 1, 3]


def test_direction_matters_maximize_vs_minimize():
    points = pts((10, 50), (12, 80), (13, 60), (20, 120), (11, 40), names=("ppl", "decode_tps"))
    assert pareto_front(points, minimize=("ppl",), maximize=("decode_tps",)) == [0, 1, 3]
    # treating speed as a cost instead gives the other corner
    assert pareto_front(points, minimize=("ppl", "decode_tps")) == [0, 4]
    assert pareto_front(points, maximize=("ppl", "decode_tps")) == [3]


def test_ties_are_all_on_the_front_and_duplicates_of_dominated_points_are_off():
    points = pts((1, 2), (1, 2), (2, 1), (3, 3), (3, 3))
    assert pareto_front(points, minimize=("ppl", "size_mb")) == [0, 1, 2]
    assert pareto_front(pts((4, 4), (4, 4)), minimize=("ppl", "size_mb")) == [0, 1]
    # equal on one metric, better on the other: dominated
    assert pareto_front(pts((1, 2), (1, 3)), minimize=("ppl", "size_mb")) == [0]


def test_three_metrics():
    points = [{"a": 1, "b": 1, "c": 1}, {"a": 0, "b": 2, "c": 1}, {"a": 1, "b": 1, "c": 0},
              {"a": 2, "b": 2, "c": 2}]
    # minimize a and b, maximize c: #2 loses to #0 on c; #3 wins on c alone
    assert pareto_front(points, minimize=("a", "b"), maximize=("c",)) == [0, 1, 3]


def test_missing_nan_and_non_numbers_take_no_part():
    points = [{"ppl": 1.0}, {"ppl": 0.5, "size_mb": 0.5}, {"ppl": float("nan"), "size_mb": 0.1},
              {"ppl": True, "size_mb": 0.1}, {"ppl": "3", "size_mb": 0.1}, {"ppl": 2.0, "size_mb": 1.0}]
    assert pareto_front(points, minimize=("ppl", "size_mb")) == [1]
    assert pareto_front([], minimize=("ppl",)) == []
    assert pareto_front([{"x": 1}], minimize=("ppl",)) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        pareto_front(pts((1, 2)))
    with pytest.raises(ValueError, match="both"):
        pareto_front(pts((1, 2)), minimize=("ppl",), maximize=("ppl",))


def test_dominates():
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (1, 2)) and not dominates((0, 3), (1, 2))


def sweep_front(points: list[tuple[int, int]]) -> list[int]:
    """Reference for two minimized metrics: sort the distinct points, keep each whose second
    metric beats every earlier one; every copy of a kept point is on the front."""
    kept, best = set(), float("inf")
    for p in sorted(set(points)):
        if p[1] < best:
            kept.add(p)
            best = p[1]
    return [i for i, p in enumerate(points) if p in kept]


@pytest.mark.parametrize("seed", range(20))
def test_random_points_match_sweep_reference(seed):
    rng = random.Random(seed)
    raw = [(rng.randint(0, 12), rng.randint(0, 12)) for _ in range(rng.randint(1, 40))]  # many ties
    assert pareto_front(pts(*raw), minimize=("ppl", "size_mb")) == sweep_front(raw)
    # maximizing the second metric is minimizing its negative
    flipped = [(a, -b) for a, b in raw]
    assert pareto_front(pts(*raw), minimize=("ppl",), maximize=("size_mb",)) == sweep_front(flipped)
