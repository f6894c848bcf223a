"""Sibling packed linears (q/k/v, gate/up) computed by one kernel call: same outputs bit for bit,
one call per group, nothing stale, nothing held between calls."""
from __future__ import annotations

import pytest
import torch

import frugalflow.quant.pack as pack
from frugalflow.arch import compressible_linears
from frugalflow.models import load_model, save_model
from frugalflow.quant.fused import fuse_siblings
from frugalflow.quant.pack import QuantLinear, quantize_layers, quantize_model
from frugalflow.quant.rtn import compute_qparams, quantize
from tests.conftest import build_tiny_llama


def _qparams(model, bits, group_size, symmetric=False):
    out = {}
    for name, m in compressible_linears(model).items():
        W = m.weight.detach().float()
        scale, zero = compute_qparams(W, bits, group_size, symmetric)
        out[name] = (quantize(W, scale, zero, bits, group_size), scale, zero)
    return out


def _saved(tmp_path, bits, group_size, symmetric=False, layer_grids=None):
    model = build_tiny_llama()
    qparams = _qparams(model, bits, group_size, symmetric)
    if layer_grids:  # {layer index: (bits, group_size, symmetric)}
        for index, grid in layer_grids.items():
            finer = _qparams(model, *grid)
            qparams |= {n: v for n, v in finer.items() if n.startswith(f"model.layers.{index}.")}
        quantize_layers(model, qparams, (bits, group_size, symmetric), layer_grids)
    else:
        quantize_model(model, qparams, bits, group_size, symmetric=symmetric)
    return save_model(model, tmp_path / f"q{bits}-{group_size}", tokenizer_dir=None)


def _unlinked(folder, dtype=torch.float32):
    model = load_model(folder, dtype=dtype)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.siblings = None
    return model


def _siblings(model):
    return {m.siblings for m in model.modules() if isinstance(m, QuantLinear) and m.siblings is not None}


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, -1, True), (8, -1, False), (8, -1, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linked_model_computes_the_same_logits_bit_for_bit(tmp_path, bits, group_size, symmetric,
                                                           dtype):
    folder = _saved(tmp_path, bits, group_size, symmetric)
    linked, plain = load_model(folder, dtype=dtype), _unlinked(folder, dtype)
    groups = _siblings(linked)
    assert len(groups) == 4  # 2 layers x (q/k/v, gate/up)
    assert sorted(len(g.members) for g in groups) == [2, 2, 3, 3]
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 9))
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            for x in (ids[:1, :1], ids[:1], ids):  # decode, prefill, a batch
                assert torch.equal(linked(x).logits, plain(x).logits)
    with torch.inference_mode():
        a = linked.generate(ids[:1, :3], max_new_tokens=12, do_sample=False, pad_token_id=0)
        b = plain.generate(ids[:1, :3], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_one_kernel_call_per_group_and_nothing_held(tmp_path, monkeypatch):
    folder = _saved(tmp_path, 4, 32)
    model = load_model(folder)
    calls = []
    real = pack.INT4_MM_CPU
    monkeypatch.setattr(pack, "INT4_MM_CPU", lambda *a: calls.append(a[1].shape) or real(*a))
    with torch.no_grad():
        model(torch.tensor([[5]]))
    # per layer: q/k/v in one call (64 + 32 + 32 rows), o_proj, gate/up in one call (128 + 128), down_proj
    assert sorted(shape[0] for shape in calls) == [64, 64, 64, 64, 128, 128, 256, 256]  # unlinked: 14 calls
    assert all(g._last is None for g in _siblings(model))  # every sibling took its columns


def test_a_sibling_called_again_or_after_an_in_place_change_recomputes(tmp_path):
    folder = _saved(tmp_path, 4, 32)
    model = load_model(folder)
    attn = model.model.layers[0].self_attn
    ref = QuantLinear.from_codes(attn.k_proj.codes(), attn.k_proj.scales, attn.k_proj.zeros, 4, 32)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        q = attn.q_proj(x)
        assert torch.equal(attn.k_proj(x), ref(x))
        assert torch.equal(attn.k_proj(x), ref(x))  # twice: recomputed, not a column taken twice
        x.mul_(3.0)  # in place between the siblings' calls: the held output is stale
        assert torch.equal(attn.k_proj(x), ref(x))
        assert not torch.equal(attn.q_proj(x), q)


def test_only_siblings_on_one_fusable_kernel_are_linked(tmp_path):
    # 3 bits: no integer kernel, nothing linked
    assert not _siblings(load_model(_saved(tmp_path, 3, 32)))
    # layer 1 at 8 bits per channel: both layers linked, each on its own kernel
    model = load_model(_saved(tmp_path, 4, 32, layer_grids={1: (8, -1, True)}))
    assert sorted(g.path for g in _siblings(model)) == ["int4", "int4", "int8", "int8"]
    # a group whose members differ in grid is left unlinked
    model = build_tiny_llama()
    k = "model.layers.0.self_attn.k_proj"
    at4, at8 = _qparams(model, 4, 32), _qparams(model, 8, -1)
    quantize_model(model, {n: v for n, v in at4.items() if n != k}, 4, 32)
    quantize_model(model, {k: at8[k]}, 8, -1)
    assert fuse_siblings(model) == 3
    assert model.model.layers[0].self_attn.q_proj.siblings is None


def test_loading_new_weights_refreshes_the_fused_kernel(tmp_path):
    a, b = load_model(_saved(tmp_path, 4, 32)), None
    other = build_tiny_llama(seed=3)
    quantize_model(other, _qparams(other, 4, 32), 4, 32)
    b = save_model(other, tmp_path / "other", tokenizer_dir=None)
    x = torch.tensor([[7]])
    with torch.no_grad():
        before = a(x).logits
        a.load_state_dict(load_model(b).state_dict())
        assert torch.equal(a(x).logits, _unlinked(b)(x).logits)
        assert not torch.equal(a(x).logits, before)
