"""Exact paired sign-flip test: is the mean of paired differences (one per seed) distinguishable from 0?"""
from __future__ import annotations

import itertools
import statistics

MAX_PAIRS = 20  # 2^20 sign patterns: exact enumeration stays under a few seconds


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided p-value of the paired randomisation test: the share of the 2^n sign patterns of `diffs`
    whose mean is at least as far from 0 as the observed mean (under 'no difference' each sign is a coin)."""
    if not diffs:
        raise ValueError("sign_flip_p needs at least one difference")
    if len(diffs) > MAX_PAIRS:
        raise ValueError(f"{len(diffs)} pairs: exact enumeration is limited to {MAX_PAIRS}")
    observed = abs(sum(diffs)) - 1e-12 * len(diffs)  # ties with the observed sum count as extreme
    magnitudes = [abs(x) for x in diffs]
    extreme = sum(abs(sum(s * m for s, m in zip(signs, magnitudes))) >= observed
                  for signs in itertools.product((1, -1), repeat=len(diffs)))
    return extreme / 2 ** len(diffs)


def mean_and_p(diffs: list[float]) -> str:
    """'mean +0.05, p 0.44' for a table cell."""
    return f"mean {statistics.fmean(diffs):+.2f}, p {sign_flip_p(diffs):.2g}"
