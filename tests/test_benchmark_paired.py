"""benchmarks/paired.py: the exact paired sign-flip test that domains.py puts beside TSLD minus KL."""
from __future__ import annotations

import random
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.paired import MAX_PAIRS, interval, mean_and_p, sign_flip_p  # noqa: E402


def by_bitmask(diffs: list[float]) -> float:
    """The same p-value counted another way: bit i of a mask flips the sign of difference i."""
    n, total = len(diffs), abs(sum(diffs))
    hits = sum(abs(sum(-x if mask >> i & 1 else x for i, x in enumerate(diffs))) >= total - 1e-9
               for mask in range(2 ** n))
    return hits / 2 ** n


def test_one_sign_everywhere_gives_the_smallest_p_n_pairs_can_give():
    assert sign_flip_p([0.3, 0.1, 0.2, 0.4]) == 2 / 2**4
    assert sign_flip_p([-0.3, -0.1, -0.2, -0.4]) == 2 / 2**4


def test_differences_that_cancel_or_vanish_are_indistinguishable_from_zero():
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0


def test_one_large_difference_against_the_rest_is_not_significant():
    """Four small TSLD losses and one large win: the mean favours TSLD, the test does not."""
    p = sign_flip_p([0.1, 0.1, 0.1, 0.1, -2.0])
    assert p == by_bitmask([0.1, 0.1, 0.1, 0.1, -2.0]) and p > 0.5


def test_matches_a_second_count_on_random_seeds():
    rng = random.Random(7)
    for _ in range(20):
        diffs = [round(rng.gauss(0.05, 0.15), 2) for _ in range(rng.randint(1, 9))]
        assert sign_flip_p(diffs) == pytest.approx(by_bitmask(diffs))


def test_interval_holds_the_mean_moves_with_a_shift_and_needs_enough_seeds():
    diffs = [0.08, 0.13, 0.01, 0.18, -0.14, 0.00]
    low, high = interval(diffs)
    assert min(diffs) < low < sum(diffs) / len(diffs) < high < max(diffs)
    for inside, outside in ((low, low - 0.01), (high, high + 0.01)):  # its ends are where the test turns
        assert sign_flip_p([x - inside for x in diffs]) >= 0.1 > sign_flip_p([x - outside for x in diffs])
    shifted = interval([x + 0.5 for x in diffs])
    assert shifted == pytest.approx((low + 0.5, high + 0.5))
    assert interval(diffs[:4]) is None  # 4 seeds: the smallest p is 2/16, no 90% interval
    steady = interval([0.1, 0.11, 0.09, 0.1, 0.12, 0.1])  # seeds that agree: a narrow interval around them
    assert 0.09 <= steady[0] <= 0.1 <= steady[1] <= 0.12 and steady[1] - steady[0] < high - low


def test_cell_text_and_limits():
    assert mean_and_p([-0.06, -0.06, -0.28, -0.13]) == "mean -0.13, p 0.12"
    five = [-0.06, -0.06, -0.28, -0.13, -0.11]
    assert mean_and_p(five) == "mean -0.13 [{:+.2f}, {:+.2f}], p 0.062".format(*interval(five))
    with pytest.raises(ValueError, match="at least one"):
        sign_flip_p([])
    with pytest.raises(ValueError, match=str(MAX_PAIRS)):
        sign_flip_p([0.1] * (MAX_PAIRS + 1))
