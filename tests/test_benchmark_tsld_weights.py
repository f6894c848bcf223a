"""benchmarks/tsld_weights.py: the statistics that say how far TSLD's token weights move its loss
from plain KL, on weights with known answers."""
from __future__ import annotations

import sys

import pytest
import torch
from helpers import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.tsld_weights import weight_stats  # noqa: E402
from frugalflow.distill.losses import IGNORE_INDEX, token_scale  # noqa: E402


def test_uniform_weights_are_plain_kl():
    kl = torch.rand(3, 10) + 0.1
    stats = weight_stats(torch.full((3, 10), 0.1), kl, torch.ones(3, 10, dtype=torch.bool))
    assert stats["effective_share"] == 1.0 and stats["top_weight"] == 1.0 and stats["p90_p10"] == 1.0
    assert stats["emphasis"] == 1.0


def test_weights_following_kl_emphasise_it_and_correlate():
    kl = torch.linspace(0.1, 2.0, 20).repeat(2, 1)
    w = torch.softmax(kl / 0.5, dim=-1)  # log w is linear in kl
    stats = weight_stats(w, kl, torch.ones(2, 20, dtype=torch.bool))
    expected = float((w[0].double() * kl[0].double()).sum() / kl[0].double().mean())
    assert stats["emphasis"] == pytest.approx(expected, abs=1e-3) and stats["emphasis"] > 1.5
    assert stats["corr_score_kl"] == pytest.approx(1.0, abs=1e-3)
    assert stats["effective_share"] < 1.0 and stats["top_weight"] > 1.0 and stats["p90_p10"] > 1.0
    against = weight_stats(torch.softmax(-kl / 0.5, dim=-1), kl, torch.ones(2, 20, dtype=torch.bool))
    assert against["emphasis"] < 1.0 and against["corr_score_kl"] == pytest.approx(-1.0, abs=1e-3)


def test_one_heavy_token_leaves_one_effective_token_and_ignored_tokens_do_not_count():
    scores = torch.zeros(1, 8, 5)
    labels = torch.zeros(1, 8, dtype=torch.long)
    labels[0, 6:] = IGNORE_INDEX
    scores[0, 2, 1:] = 50.0  # the teacher is sure of token 1 at position 2, so label 0 costs it ~50 nats
    w = token_scale(scores, labels, tau=1.0)
    assert w[0, 6:].eq(0).all() and w[0].sum() == pytest.approx(1.0)
    stats = weight_stats(w, torch.ones(1, 8), labels != IGNORE_INDEX)
    assert stats["effective_share"] == pytest.approx(1 / 6, abs=1e-3) and stats["top_weight"] == pytest.approx(6.0, abs=1e-3)
