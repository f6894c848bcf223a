"""Wanda: per-row comparison group, exact counts, N:M, and the model-level run against hooks."""
from __future__ import annotations

import copy

import pytest
import torch

from frugalflow.arch import arch_of, compressible_linears, decoder_layers
from frugalflow.prune.wanda import prune_counts, prune_wanda, wanda_mask


def naive_wanda_keep(W, x_norm, sparsity):
    """Paper's rule, row by row: drop the int(in * sparsity) lowest |W| * ||X||."""
    keep = torch.ones_like(W, dtype=torch.bool)
    k = int(W.shape[1] * sparsity)
    for r in range(W.shape[0]):
        score = [(abs(W[r, j].item()) * x_norm[j].item(), j) for j in range(W.shape[1])]
        for _, j in sorted(score)[:k]:
            keep[r, j] = False
    return keep


def test_mask_matches_naive_rule():
    g = torch.Generator().manual_seed(0)
    W, x_norm = torch.randn(6, 40, generator=g), torch.rand(40, generator=g) * 5
    for sparsity in (0.25, 0.5, 0.75):
        assert torch.equal(wanda_mask(W, x_norm, sparsity), naive_wanda_keep(W, x_norm, sparsity))


def test_activation_norm_changes_the_choice():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert wanda_mask(W, torch.ones(4), 0.5).tolist() == [[False, False, True, True]]
    assert wanda_mask(W, torch.tensor([10.0, 10.0, 0.1, 0.1]), 0.5).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.37, 0.01])
def test_unstructured_exact_counts(sparsity):
    g = torch.Generator().manual_seed(1)
    W, x_norm = torch.randn(13, 48, generator=g), torch.rand(48, generator=g)
    keep = wanda_mask(W, x_norm, sparsity)
    assert (~keep).sum().item() == round(13 * 48 * sparsity)
    per_row = (~keep).sum(1)
    assert per_row.max() - per_row.min() <= 1
    assert prune_counts(13, 48, sparsity).sum().item() == round(13 * 48 * sparsity)


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_pattern(n_m):
    n, m = n_m
    g = torch.Generator().manual_seed(2)
    W, x_norm = torch.randn(8, 32, generator=g), torch.rand(32, generator=g)
    keep = wanda_mask(W, x_norm, 0.5, n_m=n_m)  # n kept of every m, as magnitude.py
    assert (keep.reshape(8, -1, m).sum(-1) == n).all()
    score = (W.abs() * x_norm).reshape(8, -1, m)
    kept_min = torch.where(keep.reshape(8, -1, m), score, torch.inf).amin(-1)
    pruned_max = torch.where(~keep.reshape(8, -1, m), score, -torch.inf).amax(-1)
    assert (pruned_max <= kept_min).all()
    with pytest.raises(ValueError):
        wanda_mask(torch.randn(2, 30), torch.rand(30), 0.5, n_m=(2, 4))


def linear_input_norms(model, ids, layer_index):
    arch, norms, handles = arch_of(model), {}, []
    layer = decoder_layers(model)[layer_index]
    for name in arch.linears:
        handles.append(layer.get_submodule(name).register_forward_hook(
            lambda _m, inp, _o, name=name: norms.__setitem__(name, inp[0].reshape(-1, inp[0].shape[-1]))))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return norms


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_prune_wanda_model_uses_sequential_activations(tiny_model, n_m):
    ids = torch.randint(0, 384, (3, 32), generator=torch.Generator().manual_seed(0))
    original = copy.deepcopy(tiny_model)
    stats = prune_wanda(tiny_model, ids, 0.5, n_m=n_m, batch_size=2, recon_stride=1)
    arch = arch_of(tiny_model)
    # layer 0 sees the dense model; layer 1 sees the pruned layer 0 and its own dense weights
    probe = copy.deepcopy(original)
    decoder_layers(probe)[0].load_state_dict(decoder_layers(tiny_model)[0].state_dict())
    for i, model_for_inputs in ((0, original), (1, probe)):
        X = linear_input_norms(model_for_inputs, ids, i)
        for name in arch.linears:
            W0 = decoder_layers(original)[i].get_submodule(name).weight.data
            keep = wanda_mask(W0, X[name].norm(dim=0), 0.5, n_m)
            W = decoder_layers(tiny_model)[i].get_submodule(name).weight.data
            assert torch.equal(W != 0, keep), (i, name)
            torch.testing.assert_close(W, W0 * keep)
            full = f"{arch.layers}.{i}.{name}"
            direct = (((W - W0) @ X[name].T) ** 2).sum() / ((W0 @ X[name].T) ** 2).sum()
            assert stats[full]["recon_error"] == pytest.approx(direct.item(), rel=1e-3)
            assert stats[full]["sparsity"] == 0.5
    assert set(stats) == set(compressible_linears(tiny_model))
