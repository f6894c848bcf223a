"""AWQ: scale search beats RTN on outlier channels, folding keeps the float function, masks survive."""
from __future__ import annotations

import copy

import pytest
import torch
from test_calibration import build_tiny_opt
from transformers import LlamaConfig, LlamaForCausalLM

from frugalflow.arch import compressible_linears, decoder_layers
from frugalflow.quant.awq import awq_apply, awq_quantize, awq_search, search_clip, search_scales
from frugalflow.quant.rtn import fake_quantize


def outlier_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X[:, [3, 17, 40]] *= 25  # a few outlier channels
    return X


def out_error(W, W_new, X):
    return (((W_new - W) @ X.T) ** 2).sum().item()


def build_tiny_mha_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def with_outlier_norms(model):
    """Give the norms a few large channels, as trained LLMs have, so activations have outliers."""
    with torch.no_grad():
        for layer in decoder_layers(model):
            for norm in ("input_layernorm", "post_attention_layernorm", "self_attn_layer_norm", "final_layer_norm"):
                if hasattr(layer, norm):
                    getattr(layer, norm).weight.data[[5, 21, 50]] *= 20
    return model


@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, -1), (4, 32)])
def test_scale_search_beats_rtn_on_outlier_channels(bits, group_size):
    X = outlier_inputs()
    H = 2 / X.shape[0] * X.T @ X
    g = torch.Generator().manual_seed(1)
    Ws = [torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)]
    s, alpha, rtn_err, best_err = search_scales(Ws, H, X.abs().mean(0), bits, group_size, symmetric=False)
    assert alpha > 0 and best_err < 0.8 * rtn_err
    direct_rtn = sum(out_error(W, fake_quantize(W, bits, group_size, False), X) for W in Ws)
    direct_awq = sum(out_error(W, fake_quantize(W * s, bits, group_size, False) / s, X) for W in Ws)
    assert direct_awq < 0.8 * direct_rtn
    assert rtn_err == pytest.approx(2 / X.shape[0] * direct_rtn, rel=1e-3)  # the Gram objective is the output MSE


def test_clip_search_is_the_per_group_argmin():
    X = outlier_inputs(d=64)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    clip = search_clip(W, H, 3, 32, symmetric=False)
    amax = W.abs().reshape(4, 2, 32).amax(-1)
    assert clip.shape == (4, 2) and (clip <= amax + 1e-6).all() and (clip >= 0.5 * amax - 1e-6).all()
    assert (clip < amax - 1e-6).any()  # some group gains from clipping
    for r in range(4):
        for k in range(2):
            w, x = W[r, k * 32:(k + 1) * 32], X[:, k * 32:(k + 1) * 32]
            errs = []
            for i in range(10):
                m = amax[r, k] * (1 - i / 20)
                wq = fake_quantize(w.clamp(-m, m).unsqueeze(0), 3, -1, False)[0]
                errs.append(((x @ (wq - w)) ** 2).sum().item())
            best = amax[r, k] * (1 - min(range(10), key=errs.__getitem__) / 20)
            assert clip[r, k].item() == pytest.approx(best.item(), rel=1e-5)


@pytest.mark.parametrize("family", ["llama_gqa", "llama_mha", "opt"])
def test_apply_keeps_float_function(family, tiny_model):
    model = {"llama_gqa": lambda: tiny_model, "llama_mha": build_tiny_mha_llama,
             "opt": lambda: build_tiny_opt().eval()}[family]()
    with_outlier_norms(model)
    ids = torch.randint(0, 384, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    state = copy.deepcopy(model.state_dict())
    result = awq_search(model, ids, 3, 32, False, clip_search=False, batch_size=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # the search does not touch the model
    per_layer = {"llama_gqa": 3, "llama_mha": 4, "opt": 3}[family]  # GQA: v_proj -> o_proj skipped
    assert len(result["scales"]) == 2 * per_layer and result["clips"] == {}
    assert any(e["alpha"] > 0 for e in result["scales"])
    # random positive scales make the folding check independent of what the search picked
    g = torch.Generator().manual_seed(1)
    for e in result["scales"]:
        e["scales"] = torch.rand(e["scales"].shape, generator=g) * 3 + 0.2
    awq_apply(model, result)
    assert not torch.equal(model.state_dict()[next(iter(compressible_linears(model))) + ".weight"],
                           state[next(iter(compressible_linears(model))) + ".weight"])
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def logits_error(model, reference, ids):
    with torch.no_grad():
        return ((model(ids).logits - reference) ** 2).mean().item()


@pytest.mark.parametrize("clip_search", [False, True])
def test_awq_quantize_beats_rtn(tiny_model, clip_search):
    model = with_outlier_norms(tiny_model)
    ids = torch.randint(0, 384, (6, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    rtn = copy.deepcopy(model)
    with torch.no_grad():
        for lin in compressible_linears(rtn).values():
            lin.weight.data = fake_quantize(lin.weight.data, 3, 32, False)
    qparams, stats, result = awq_quantize(model, ids, 3, 32, False, clip_search=clip_search)
    assert set(qparams) == set(stats) == set(compressible_linears(model))
    assert bool(result["clips"]) == clip_search
    if clip_search:
        assert not any(k.endswith(("q_proj", "k_proj")) for k in result["clips"])
    for name, s in stats.items():
        assert s["awq_error"] <= s["rtn_error"] * 1.0001, name
    assert logits_error(model, reference, ids) < 0.8 * logits_error(rtn, reference, ids)


def test_masks_survive_scaling_clipping_and_rtn(tiny_model):
    model = with_outlier_norms(tiny_model)
    ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for lin in compressible_linears(model).values():
            lin.weight.data[:, 1::2] = 0
    result = awq_search(model, ids, 4, 32, False)
    assert any(e["alpha"] > 0 for e in result["scales"])
    applied = copy.deepcopy(model)
    awq_apply(applied, result)
    for lin in compressible_linears(applied).values():
        assert (lin.weight.data[:, 1::2] == 0).all()
    awq_quantize(model, ids, 4, 32, True)
    for lin in compressible_linears(model).values():
        assert (lin.weight.data[:, 1::2] == 0).all()
