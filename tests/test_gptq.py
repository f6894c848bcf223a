"""GPTQ: beats RTN where it must, matches a plain column-by-column transcription, keeps masks."""
from __future__ import annotations

import copy

import pytest
import torch

from frugalflow.arch import compressible_linears, decoder_layers
from frugalflow.quant.gptq import gptq_quantize, gptq_quantize_weight
from frugalflow.quant.rtn import compute_qparams, dequantize, fake_quantize


def correlated_inputs(n=1024, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 1.5 * torch.randn(d, d, generator=g) / d ** 0.5
    X = torch.randn(n, d, generator=g) @ mix
    X *= torch.rand(d, generator=g) * 3 + 0.2  # uneven channel importance, so act_order matters
    return X


def out_error(W, W_new, X):
    return (((W_new - W) @ X.T) ** 2).sum().item() / ((W @ X.T) ** 2).sum().item()


def naive_gptq(W, H, bits, group_size, symmetric, act_order, percdamp=0.01):
    """Column by column, no lazy blocks: group grid from the current weights at the group's first column."""
    W = W.clone().float()
    cols = W.shape[1]
    G = cols if group_size == -1 else group_size
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    Hp = H[perm][:, perm] + percdamp * torch.diag(H).mean() * torch.eye(cols)
    U = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True)
    W = W[:, perm]
    scale, zero = torch.zeros(W.shape[0], cols // G), torch.zeros(W.shape[0], cols // G)
    done, Q = set(), torch.zeros_like(W)
    for p in range(cols):
        g = perm[p].item() // G
        if g not in done:
            done.add(g)
            members = [int((perm == c).nonzero()) for c in range(g * G, (g + 1) * G)]
            s, z = compute_qparams(W[:, members], bits, -1, symmetric)
            scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
        s, z = scale[:, g], zero[:, g]
        q = (torch.clamp(torch.round(W[:, p] / s + z), 0, 2 ** bits - 1) - z) * s
        err = (W[:, p] - q) / U[p, p]
        W[:, p:] -= err.unsqueeze(1) * U[p, p:].unsqueeze(0)
        Q[:, p] = q
    return Q[:, torch.argsort(perm)], scale, zero


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_on_correlated_inputs(bits, group_size, act_order):
    X = correlated_inputs()
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    q, scale, zero, loss = gptq_quantize_weight(W, H, bits, group_size, symmetric=False, act_order=act_order)
    n_groups = 1 if group_size == -1 else 128 // group_size
    assert q.dtype == torch.uint8 and q.shape == W.shape and int(q.max()) <= 2 ** bits - 1
    assert scale.shape == zero.shape == (48, n_groups) and torch.equal(zero, zero.round())
    W_q = dequantize(q, scale, zero, group_size)
    assert out_error(W, W_q, X) < 0.6 * out_error(W, fake_quantize(W, bits, group_size, False), X)
    assert loss > 0


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_plain_column_loop(act_order, symmetric):
    """Lazy blocks (blocksize 8 < group 32: group grids need the not-yet-applied updates) change nothing."""
    X = correlated_inputs(d=64)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    q, scale, zero, _ = gptq_quantize_weight(W, H, 4, 32, symmetric, act_order=act_order, blocksize=8)
    Q_ref, scale_ref, zero_ref = naive_gptq(W, H, 4, 32, symmetric, act_order)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-4, atol=1e-6)
    assert (zero != zero_ref).float().mean() < 0.02
    assert (dequantize(q, scale, zero, 32) - Q_ref).abs().gt(1e-4).float().mean() < 0.01


def test_static_groups_follow_original_columns():
    """With act_order each column still lives on its own (original-index) group's grid."""
    X = correlated_inputs(d=64)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    W[:, 32:] *= 10  # group 1 has a much wider range than group 0
    q, scale, zero, _ = gptq_quantize_weight(W, H, 4, 32, False, act_order=True)
    assert (scale[:, 1] > 4 * scale[:, 0]).all()
    W_q = dequantize(q, scale, zero, 32)
    assert out_error(W, W_q, X) < out_error(W, fake_quantize(W, 4, 32, False), X)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mask_keeps_zeros_exactly(act_order, symmetric):
    X = correlated_inputs(d=64)
    H = 2 / X.shape[0] * X.T @ X
    g = torch.Generator().manual_seed(4)
    keep = torch.rand(32, 64, generator=g) > 0.5
    W = torch.randn(32, 64, generator=g) * keep
    q, scale, zero, _ = gptq_quantize_weight(W, H, 3, 32, symmetric, act_order=act_order, mask=keep)
    W_q = dequantize(q, scale, zero, 32)
    assert (W_q[~keep] == 0).all()
    assert torch.equal(q[~keep].float(), zero.repeat_interleave(32, dim=1)[~keep])
    assert (W_q[keep] != 0).float().mean() > 0.6  # 3-bit rounding zeroes some kept weights too
    rtn_masked = fake_quantize(W, 3, 32, symmetric) * keep
    assert out_error(W, W_q, X) < out_error(W, rtn_masked, X)


def test_dead_inputs():
    X = correlated_inputs(d=32)
    X[:, 3] = 0
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    q, scale, zero, loss = gptq_quantize_weight(W, H, 4, -1, False)
    W_q = dequantize(q, scale, zero, -1)
    assert torch.isfinite(W_q).all() and (W_q[:, 3] == 0).all()


def logits_error(model, reference, ids):
    with torch.no_grad():
        return ((model(ids).logits - reference) ** 2).mean().item()


def test_gptq_quantize_model(tiny_model):
    ids = torch.randint(0, 384, (6, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tiny_model(ids).logits
    rtn = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for lin in compressible_linears(rtn).values():
            lin.weight.data = fake_quantize(lin.weight.data, 3, 32, False)
    steps = []
    qparams, stats = gptq_quantize(tiny_model, ids, 3, 32, False, on_progress=lambda i, n: steps.append(i),
                                   batch_size=4)
    linears = compressible_linears(tiny_model)
    assert set(qparams) == set(stats) == set(linears) and steps == [0, 1]
    for name, lin in linears.items():
        q, scale, zero = qparams[name]
        assert q.dtype == torch.uint8 and scale.shape == (lin.out_features, lin.in_features // 32)
        assert torch.equal(lin.weight.data, dequantize(q, scale, zero, 32))
        assert 0 < stats[name]["recon_error"] < 0.2
    assert logits_error(tiny_model, reference, ids) < 0.7 * logits_error(rtn, reference, ids)


def test_awq_scales_share_gptq_calibration_pass(tiny_model):
    """With `awq_scales`, the scale search reads the statistics GPTQ's own pass collects: every decoder layer
    runs twice per batch (statistics, then propagation of its quantized outputs; once for the last), not
    three times; the scales are folded into the model and GPTQ's codes are on the scaled weights."""
    ids = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    layers = decoder_layers(tiny_model)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    norm_before = layers[0].input_layernorm.weight.detach().clone()
    found = []
    qparams, _ = gptq_quantize(tiny_model, ids, 4, 32, False, batch_size=2, awq_scales=found)
    batches = 2
    assert calls == [2 * batches] * (len(layers) - 1) + [batches]
    assert {e["prev"] for e in found} >= {f"model.layers.{i}.input_layernorm" for i in range(len(layers))}
    assert all(0 <= e["alpha"] < 1 for e in found)
    first = next(e for e in found if e["prev"] == "model.layers.0.input_layernorm")
    torch.testing.assert_close(layers[0].input_layernorm.weight.detach(), norm_before / first["scales"])
    q, scale, zero = qparams["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(layers[0].self_attn.q_proj.weight.data, dequantize(q, scale, zero, 32))


def test_without_propagation_each_layer_runs_once_per_batch(tiny_model):
    """propagate=False: every layer calibrates on the float model's activations, so each decoder layer runs
    once per batch, and the first layer's codes are those of the default (its inputs are the same)."""
    ids = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    layers = decoder_layers(tiny_model)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    qparams, _ = gptq_quantize(tiny_model, ids, 4, 32, False, batch_size=2, propagate=False)
    assert calls == [2] * len(layers)
    tiny_model.load_state_dict(state)
    default, _ = gptq_quantize(tiny_model, ids, 4, 32, False, batch_size=2)
    first, last = "model.layers.0.self_attn.q_proj", f"model.layers.{len(layers) - 1}.mlp.down_proj"
    assert all(torch.equal(a, b) for a, b in zip(qparams[first], default[first]))
    assert not torch.equal(qparams[last][0], default[last][0])


def test_gptq_quantize_preserves_pruned_zeros(tiny_model):
    ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for lin in compressible_linears(tiny_model).values():
            lin.weight.data[:, ::2] = 0
    gptq_quantize(tiny_model, ids, 4, 32, True, act_order=True)
    for lin in compressible_linears(tiny_model).values():
        assert (lin.weight.data[:, ::2] == 0).all()
        assert (lin.weight.data[:, 1::2] != 0).float().mean() > 0.7


def test_qparams_pack_into_quant_linears(tiny_model):
    """The (q, scale, zero) we return are what pack.quantize_model stores: same function as our weights."""
    from frugalflow.quant.pack import quantize_model

    ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    qparams, _ = gptq_quantize(tiny_model, ids, 3, 32, False, act_order=True)
    with torch.no_grad():
        expected = tiny_model(ids).logits
    quantize_model(tiny_model, qparams, 3, 32, scale_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_search_qparams_never_worse_than_full_range():
    """Each row's shrunk grid has at most the full range's weighted rounding error, and heavy-tailed rows shrink."""
    from frugalflow.quant.rtn import search_qparams

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 64, generator=g)
    W[:8, 0] = 12.0  # one outlier per row: clipping it pays on these rows
    importance = torch.rand(64, generator=g) + 0.1
    importance[0] = 0.01  # ...the more so as the outlier's column matters little

    def error(scale, zero):
        q = torch.clamp(torch.round(W / scale + zero), 0, 15)
        return (((q - zero) * scale - W) ** 2 * importance).sum(1)

    full = error(*compute_qparams(W, 4, -1, False))
    searched_scale, searched_zero = search_qparams(W, 4, False, importance)
    searched = error(searched_scale, searched_zero)
    assert (searched <= full + 1e-6).all()
    assert (searched[:8] < 0.9 * full[:8]).all() and searched[:8].sum() < 0.7 * full[:8].sum()
    assert (searched_scale[:8] < compute_qparams(W, 4, -1, False)[0][:8]).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_search_qparams_same_choice_in_any_chunking(symmetric, monkeypatch):
    """The candidates evaluated a few at a time pick what one pass over all of them picks, the first
    best on ties; on a log8 grid the chosen scales stay on it."""
    from frugalflow.quant import rtn

    g = torch.Generator().manual_seed(1)
    W = torch.randn(96, 32, generator=g) * torch.rand(96, 1, generator=g)
    importance = torch.rand(32, generator=g)
    for offset in (None, rtn.log8_offset(W, 4)):
        whole = rtn.search_qparams(W, 4, symmetric, importance, log8_offset=offset)
        monkeypatch.setattr(rtn, "SEARCH_CHUNK_ELEMENTS", 3 * W.numel())  # 3 of the 21 candidates per pass
        chunked = rtn.search_qparams(W, 4, symmetric, importance, log8_offset=offset)
        monkeypatch.undo()
        assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
        if offset is not None:
            assert torch.equal(rtn.snap_log8(whole[0], offset), whole[0])


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_in_gptq(symmetric):
    """On a symmetric grid (its range set by max|w|) the search lowers the output error by over 8%; on an
    asymmetric one (measured here: -2% to +1.5%) it stays within 5% either way."""
    X = correlated_inputs()
    H = 2 / X.shape[0] * X.T @ X
    for seed in (1, 2):
        W = torch.randn(48, 128, generator=torch.Generator().manual_seed(seed))
        W[::4, 5] *= 25  # a few heavy weights, as LLM layers have
        errors = {}
        for clip in (False, True):
            q, scale, zero, _ = gptq_quantize_weight(W, H, 4, 32, symmetric, act_order=True, clip_search=clip)
            errors[clip] = out_error(W, dequantize(q, scale, zero, 32), X)
        if symmetric:
            assert errors[True] < 0.92 * errors[False]
        else:
            assert 0.95 * errors[False] < errors[True] < 1.05 * errors[False]


def test_clip_search_in_the_recipe(tiny_model, tmp_path):
    """`clip_search: true` reaches the solver: another, better grid than without it on the same model."""
    from frugalflow.config import GPTQQuant

    ids = torch.randint(0, 384, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tiny_model(ids).logits
    results = {}
    for clip in (False, True):
        model = copy.deepcopy(tiny_model)
        stage = GPTQQuant(method="gptq", bits=3, group_size=32, symmetric=True, clip_search=clip)
        qparams, _ = gptq_quantize(model, ids, stage.bits, stage.group_size, stage.symmetric,
                                   clip_search=stage.clip_search)
        results[clip] = (qparams, logits_error(model, reference, ids))
    name = next(iter(results[True][0]))
    assert not torch.equal(results[True][0][name][1], results[False][0][name][1])
    assert results[True][1] < results[False][1]
