"""Magnitude pruning: exact counts, the right weights removed, N:M patterns, in-place model pruning."""
from __future__ import annotations

import pytest
import torch

from frugalflow.arch import compressible_linears
from frugalflow.prune.magnitude import magnitude_mask, prune_magnitude


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.9])
def test_unstructured_exact_count_and_smallest_removed(sparsity):
    torch.manual_seed(1)
    W = torch.randn(16, 37)
    keep = magnitude_mask(W, sparsity)
    assert keep.dtype == torch.bool and keep.shape == W.shape
    assert int((~keep).sum()) == round(sparsity * W.numel())
    if 0 < sparsity:
        assert W.abs()[~keep].max() <= W.abs()[keep].min()


def test_unstructured_ties_are_deterministic():
    W = torch.tensor([[1.0, -1.0, 1.0, 2.0], [-1.0, 1.0, 0.5, 1.0]])
    keep = magnitude_mask(W, 0.5)  # remove 4: the 0.5, then the first three 1.0s in flat order
    assert keep.tolist() == [[False, False, False, True], [True, True, False, True]]
    assert torch.equal(magnitude_mask(W.clone(), 0.5), keep)


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_keeps_n_largest_per_group(n_m):
    n, m = n_m
    torch.manual_seed(2)
    W = torch.randn(12, 32)
    keep = magnitude_mask(W, 0.123, n_m)  # the sparsity argument is ignored for N:M
    groups_keep = keep.reshape(12, 32 // m, m)
    assert (groups_keep.sum(-1) == n).all()
    assert int((~keep).sum()) == W.numel() * (m - n) // m
    A = W.abs().reshape(12, 32 // m, m)
    kept_min = A.masked_fill(~groups_keep, float("inf")).amin(-1)
    dropped_max = A.masked_fill(groups_keep, -1.0).amax(-1)
    assert (dropped_max <= kept_min).all()


def test_n_m_ties_keep_earlier_index():
    W = torch.ones(1, 8)
    assert magnitude_mask(W, 0.0, (2, 4)).tolist() == [[True, True, False, False] * 2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of M"):
        magnitude_mask(torch.randn(4, 10), 0.5, (2, 4))
    with pytest.raises(ValueError, match="0 < N < M"):
        magnitude_mask(torch.randn(4, 8), 0.5, (4, 4))
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(torch.randn(4, 8), 1.0)


def test_prune_model_unstructured(tiny_model):
    before = {name: m.weight.detach().clone() for name, m in compressible_linears(tiny_model).items()}
    embed = tiny_model.model.embed_tokens.weight.detach().clone()
    report = prune_magnitude(tiny_model, 0.4)
    assert set(report) == set(before) and len(report) == 14
    for name, m in compressible_linears(tiny_model).items():
        W0, W = before[name], m.weight.detach()
        k = round(0.4 * W0.numel())
        assert int((W == 0).sum()) == k
        assert report[name]["sparsity"] == k / W0.numel()
        kept = W != 0
        assert torch.equal(W[kept], W0[kept])
        rel = ((W0 - W).norm() / W0.norm()).item()
        assert report[name]["rel_error"] == pytest.approx(rel, rel=1e-5)
        assert W0.abs()[~kept].max() <= W0.abs()[kept].min()
    assert torch.equal(tiny_model.model.embed_tokens.weight, embed)


def test_prune_model_2_4(tiny_model):
    report = prune_magnitude(tiny_model, 0.9, n_m=(2, 4))
    for name, m in compressible_linears(tiny_model).items():
        W = m.weight.detach()
        assert report[name]["sparsity"] == 0.5
        assert ((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) == 2).all()


def test_prune_zero_sparsity_is_identity(tiny_model):
    before = {name: m.weight.detach().clone() for name, m in compressible_linears(tiny_model).items()}
    report = prune_magnitude(tiny_model, 0.0)
    for name, m in compressible_linears(tiny_model).items():
        assert torch.equal(m.weight, before[name])
        assert report[name] == {"sparsity": 0.0, "rel_error": 0.0}
