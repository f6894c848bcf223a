"""Exact paired sign-flip test on differences paired by seed: is their mean distinguishable from 0,
and which shifts of it the seeds cannot reject (the interval that bounds how far one side may trail)."""
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


def interval(diffs: list[float], level: float = 0.9, step: float = 0.01) -> tuple[float, float] | None:
    """The shifts d (on a grid of `step`) that the test does not reject at 1 - `level` when applied to
    diffs - d: an exact `level` interval for the mean difference. None when n seeds are too few for any
    rejection (2 / 2^n >= 1 - level): then every shift is consistent with them."""
    if 2 / 2 ** len(diffs) >= 1 - level:
        return None
    low, high = round(min(diffs) / step), round(max(diffs) / step)
    kept = [k * step for k in range(low, high + 1) if sign_flip_p([x - k * step for x in diffs]) >= 1 - level]
    return (min(kept), max(kept)) if kept else None


def mean_and_p(diffs: list[float]) -> str:
    """'mean +0.05 [-0.03, +0.12], p 0.44' for a table cell (the 90% interval where seeds allow one)."""
    bounds = interval(diffs)
    text = f" [{bounds[0]:+.2f}, {bounds[1]:+.2f}]" if bounds else ""
    return f"mean {statistics.fmean(diffs):+.2f}{text}, p {sign_flip_p(diffs):.2g}"
