"""SparseGPT: OBS optimality, exact sparsity, N:M, dead inputs, beats magnitude, model-level run."""
from __future__ import annotations

import pytest
import torch

from frugalflow.arch import compressible_linears
from frugalflow.prune.magnitude import magnitude_mask
from frugalflow.prune.sparsegpt import prune_sparsegpt, sparsegpt_prune


def correlated_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 0.9 * torch.randn(d, d, generator=g) / d ** 0.5
    X = torch.randn(n, d, generator=g) @ mix
    X[:, :3] *= 8  # a few strong channels
    return X


def out_error(W, W_new, X):
    return (((W_new - W) @ X.T) ** 2).sum() / ((W @ X.T) ** 2).sum()


def reference_fasterprune(W, H, prunen, prunem, blocksize=128, percdamp=0.01):
    """The IST-DASLab N:M path, transcribed plainly (no lazy batching), to compare with."""
    W = W.clone().float()
    H = H.clone()
    cols = W.shape[1]
    H += percdamp * torch.diag(H).mean() * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(cols):
        if i % prunem == 0:
            tmp = W[:, i:i + prunem] ** 2 / torch.diag(Hinv)[i:i + prunem].reshape(1, -1) ** 2
            mask.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
        w = W[:, i].clone()
        q = w.clone()
        q[mask[:, i]] = 0
        err = (w - q) / Hinv[i, i]
        W[:, i:] -= err.unsqueeze(1) @ Hinv[i, i:].unsqueeze(0)
        W[:, i] = q
    return W


def test_fixed_mask_update_is_the_least_squares_solution():
    """1 row, 8 inputs; the 4 smallest weights come first, so SparseGPT prunes exactly those and its
    update of the 4 kept ones must be argmin ||(w' - w) X^T||^2 subject to w'_pruned = 0."""
    torch.manual_seed(0)
    X = correlated_inputs(n=100, d=8)
    H = 2 / 100 * X.T @ X
    w = torch.tensor([[0.02, -0.04, 0.06, 0.02, 1.0, -0.8, 0.9, 1.2]])
    W_new, keep, loss = sparsegpt_prune(w, H, 0.5, dampening=0.0)
    assert keep.tolist() == [[False] * 4 + [True] * 4]
    P, K = slice(0, 4), slice(4, 8)
    expected = w[0, K] + torch.linalg.solve(H[K, K], H[K, P] @ w[0, P])
    assert (expected - w[0, K]).abs().max() > 0.1  # the compensation is substantial
    torch.testing.assert_close(W_new[0, K], expected, rtol=1e-4, atol=1e-6)
    assert (W_new[0, P] == 0).all()
    E = W_new - w  # the OBS loss is half the quadratic error it reports
    assert loss == pytest.approx(0.5 * (E @ H @ E.T).item(), rel=1e-3)


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8), (1, 4)])
def test_nm_matches_reference_and_pattern(n_m):
    X = correlated_inputs()
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    W_new, keep, _ = sparsegpt_prune(W, H, 0.5, n_m=n_m, blocksize=32)
    n, m = n_m
    assert (keep.reshape(16, -1, m).sum(-1) == n).all()
    assert ((W_new == 0) == ~keep).all()
    torch.testing.assert_close(W_new, reference_fasterprune(W, H, m - n, m), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.37, 0.9])
@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_sparsity_is_exact(sparsity, per_row):
    X = correlated_inputs(d=80)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(13, 80, generator=torch.Generator().manual_seed(1))
    W_new, keep, _ = sparsegpt_prune(W, H, sparsity, blocksize=32, per_row=per_row)  # 3 blocks, last one short
    expected = round(13 * 80 * sparsity)
    assert (~keep).sum().item() == expected
    assert (W_new == 0).sum().item() == expected
    if per_row:
        counts = (~keep).sum(1)
        assert counts.max() - counts.min() <= 1


def test_dead_inputs_are_zeroed_and_pruned_first():
    X = correlated_inputs(d=32)
    X[:, [5, 17]] = 0
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    W_new, keep, loss = sparsegpt_prune(W, H, 0.25)
    assert torch.isfinite(W_new).all() and loss == loss
    assert (~keep[:, [5, 17]]).all()
    assert (~keep).sum().item() == 64


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_beats_magnitude_on_correlated_inputs(n_m):
    X = correlated_inputs(d=64)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    W_new, _, _ = sparsegpt_prune(W, H, 0.5, n_m=n_m)
    magnitude = W * magnitude_mask(W, 0.5, n_m)
    assert out_error(W, W_new, X) < 0.7 * out_error(W, magnitude, X)


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_prune_sparsegpt_model(tiny_model, n_m):
    ids = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny_model(ids).logits
    stats = prune_sparsegpt(tiny_model, ids, 0.5, n_m=n_m, blocksize=32, batch_size=3)
    linears = compressible_linears(tiny_model)
    assert set(stats) == set(linears)
    for name, lin in linears.items():
        W = lin.weight.data
        assert (W == 0).sum().item() == W.numel() // 2, name  # exact per linear, also inside q/k/v stacks
        assert stats[name]["sparsity"] == 0.5
        assert 0 < stats[name]["recon_error"] < 0.5
        if n_m:
            assert ((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2).all()
    with torch.no_grad():
        after = tiny_model(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
