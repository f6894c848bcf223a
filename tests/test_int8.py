"""W8A8 int8 linears: kernels against a naive fake-quant reference, per-token vs per-tensor,
calibrated static scales, bit-exact save/load, pruned zeros."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import build_tiny_llama
from safetensors.torch import load_file

from frugalflow.arch import compressible_linears
from frugalflow.models import load_model, model_stats, save_model
from frugalflow.prune.magnitude import prune_magnitude
from frugalflow.quant.int8 import (
    Int8Linear,
    dequantize_int8_model,
    int8_modules,
    int_matmul,
    observe,
    quantize_dynamic_int8,
    quantize_static_int8,
    quantize_weight,
    smoothing_factors,
)

IDS = torch.tensor([[0, 5, 17, 42, 99, 200, 383, 7, 64, 128]])


@torch.no_grad()
def logits(model):
    return model(IDS).logits


def calib(seed=1, n=4, length=24, low=0, high=384):
    return torch.randint(low, high, (n, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- naive references
def naive_weight(W):
    scale = W.double().abs().amax(1) / 127
    return torch.round(W.double() / scale[:, None]).clamp(-127, 127), scale


def naive_token_codes(x):
    """Codes as the spec defines them, in float32: round(x * (127 / max|x_t|))."""
    amax = x.float().abs().amax(-1, keepdim=True)
    return torch.round(x.float() * (127 / amax)).double(), amax.double() / 127


def naive_tensor_codes(x, act_scale):
    return torch.round(x.float() / act_scale.float()).clamp(-127, 127).double()


def naive_forward(layer, x):
    """Fake-quant in float64: dequantized int8 activations times the dequantized int8 weight."""
    x2 = x.reshape(-1, layer.in_features).float()
    if layer.mode == "dynamic":
        xq, s = naive_token_codes(x2 if layer.smooth is None else x2 / layer.smooth)
    else:
        s = float(layer.act_scale)
        xq = naive_tensor_codes(x2, layer.act_scale if layer.smooth is None else layer.smooth * layer.act_scale)
    W = layer.qweight.double() * layer.scales.double()[:, None]  # the codes of W * smooth
    y = (xq * s) @ W.T
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.reshape(*x.shape[:-1], layer.out_features)


# --------------------------------------------------------------------------- the grids and the layer
def test_weight_grid_is_symmetric_per_channel():
    torch.manual_seed(0)
    W = torch.randn(24, 40)
    W[3] = 0
    W[5, :7] = 0
    q, scale = quantize_weight(W)
    ref_q, ref_scale = naive_weight(W[torch.arange(24) != 3])
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(q[torch.arange(24) != 3].double(), ref_q)
    assert torch.allclose(scale[torch.arange(24) != 3].double(), ref_scale, rtol=1e-6)
    assert (q[3] == 0).all() and (q[5, :7] == 0).all()
    assert (q.abs().amax(1)[torch.arange(24) != 3] == 127).all()
    assert ((q.float() * scale[:, None] - W).abs() <= scale[:, None] / 2 + 1e-7).all()
    q16, s16 = quantize_weight(W, torch.float16)  # codes follow the stored (rounded) scale
    assert s16.dtype == torch.float16
    assert torch.equal(q16, torch.round(W / s16.float()[:, None]).clamp(-127, 127).to(torch.int8))


def test_int_matmul_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 300), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 300), generator=g, dtype=torch.int8)
    out = int_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), a.long() @ b.long().T)


def test_smoothing_moves_channel_outliers_into_the_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(256, 64)
    x[:, [5, 40]] *= 60  # two outlier channels, in every token
    exact = linear(x).detach()
    m = smoothing_factors(x.abs().amax(0), linear.weight, 0.5)
    expected = x.abs().amax(0).sqrt() / linear.weight.detach().abs().amax(0).sqrt()
    assert torch.allclose(m, expected, rtol=1e-5)
    plain = Int8Linear.from_linear(linear, "static", act_scale=x.abs().max() / 127)
    smooth = Int8Linear.from_linear(linear, "static", act_scale=(x / m).abs().max() / 127, smooth=m)
    assert torch.allclose(smooth.dequantize(), linear.weight, atol=float(smooth.scales.max() / m.min()))
    err_plain = float((plain(x) - exact).norm() / exact.norm())
    err_smooth = float((smooth(x) - exact).norm() / exact.norm())
    assert err_smooth < 0.02 < err_plain and err_smooth < err_plain / 3
    with pytest.raises(ValueError, match="smooth"):
        Int8Linear.from_linear(linear, "static", act_scale=1.0, smooth=-m)


@pytest.mark.parametrize("mode", ["dynamic", "static", "smooth"])
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_forward_matches_naive_fake_quant(mode, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 40, bias=True)
    x = torch.randn(rows, 2, 96) * 3
    smooth = torch.rand(96) + 0.5 if mode == "smooth" else None
    mode = "static" if mode == "smooth" else mode
    layer = Int8Linear.from_linear(linear, mode, act_scale=0.05 if mode == "static" else None, smooth=smooth)
    y = layer(x)
    ref = naive_forward(layer, x)
    assert y.shape == (rows, 2, 40) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
    xq, s = layer.quantize_input(x.reshape(-1, 96))
    if mode == "dynamic":
        ref_q, ref_s = naive_token_codes(x.reshape(-1, 96))
        assert torch.allclose(s.double(), ref_s, rtol=1e-6)
    else:
        ref_q = naive_tensor_codes(x.reshape(-1, 96), layer.act_scale if smooth is None else smooth * layer.act_scale)
        assert (ref_q.abs() == 127).any()  # the test reaches the clipping
    assert torch.equal(xq.double(), ref_q)
    # and the result is close to the float layer (8-bit error, not a wrong formula)
    exact = linear(x)
    if mode == "dynamic":
        assert (y - exact).norm() < 0.02 * exact.norm()
    # bf16 activations: quantized from float32, output in bf16
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.double(), naive_forward(layer, x.bfloat16().float()), rtol=1e-2, atol=1e-2 * ref.abs().max())


def test_per_token_survives_an_outlier_token_per_tensor_does_not():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64)
    x[3] *= 1000  # one outlier token
    exact = linear(x)
    dynamic = Int8Linear.from_linear(linear, "dynamic")
    per_tensor = Int8Linear.from_linear(linear, "static", act_scale=x.abs().max() / 127)
    others = torch.arange(8) != 3

    @torch.no_grad()
    def rel(y, rows):
        return float((y[rows] - exact[rows]).norm() / exact[rows].norm())

    assert rel(dynamic(x), others) < 0.02
    assert rel(dynamic(x), ~others) < 0.02
    assert rel(per_tensor(x), ~others) < 0.02  # the outlier itself is fine either way
    assert rel(per_tensor(x), others) > 0.3  # ... but per tensor the other tokens collapse
    # and the dynamic result of a normal token does not depend on the outlier being there
    assert torch.equal(dynamic(x)[others], dynamic(x[others]))


def test_layer_validation():
    with pytest.raises(ValueError, match="mode"):
        Int8Linear(8, 4, mode="weird")
    q, s = quantize_weight(torch.randn(4, 8))
    with pytest.raises(ValueError, match="act_scale"):
        Int8Linear.from_codes(q, s, "static")
    with pytest.raises(ValueError, match="act_scale"):
        Int8Linear.from_codes(q, s, "dynamic", act_scale=0.1)
    with pytest.raises(ValueError, match="int8 codes"):
        Int8Linear.from_codes(q.to(torch.uint8), s)
    with pytest.raises(ValueError, match="positive"):
        Int8Linear.from_codes(q, s, "static", act_scale=0.0)


def test_to_dtype_keeps_scales():
    layer = Int8Linear.from_linear(nn.Linear(16, 8, bias=True), "static", act_scale=1 / 3)
    scales, act = layer.scales.clone(), layer.act_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and layer.qweight.dtype == torch.int8
    assert torch.equal(layer.scales, scales) and torch.equal(layer.act_scale, act)


# --------------------------------------------------------------------------- model level
def test_dynamic_model(tiny_model):
    reference = logits(tiny_model)
    weights = {n: m.weight.detach().clone() for n, m in compressible_linears(tiny_model).items()}
    stats = quantize_dynamic_int8(tiny_model)
    layers = int8_modules(tiny_model)
    assert sorted(stats) == sorted(layers) == sorted(weights) and len(layers) == 14
    assert isinstance(tiny_model.lm_head, nn.Linear)
    for name, layer in layers.items():
        assert layer.mode == "dynamic"
        W = weights[name]
        expected = float((W - layer.dequantize()).norm() / W.norm())
        assert stats[name]["rel_error"] == pytest.approx(expected) and 0 < expected < 0.02
    out = logits(tiny_model)
    assert not torch.equal(out, reference)
    assert (out - reference).norm() < 0.02 * reference.norm()
    s = model_stats(tiny_model)
    n_w = sum(W.numel() for W in weights.values())
    n_out = sum(W.shape[0] for W in weights.values())
    assert s["n_compressible_weights"] == n_w
    assert s["bits_per_weight"] == (8 * n_w + 32 * n_out) / n_w
    assert s["sparsity"] == sum(int((m.qweight == 0).sum()) for m in layers.values()) / n_w
    with pytest.raises(ValueError, match="not an nn.Linear"):
        quantize_dynamic_int8(tiny_model)
    dequantize_int8_model(tiny_model)
    assert not int8_modules(tiny_model)
    assert torch.equal(tiny_model.model.layers[0].mlp.up_proj.weight, layers["model.layers.0.mlp.up_proj"].dequantize())


def _input_amax(model, windows, names):
    """max |x| over every token of `windows` at the input of each named module (forward hooks)."""
    seen = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, inp, _o, n=n: seen[n].append(inp[0].reshape(-1, inp[0].shape[-1]).abs().amax(-1)))
        for n in names]
    with torch.no_grad():
        model(windows, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_static_scales_come_from_calibration(tiny_model):
    windows = calib(1, high=192)
    first = "model.layers.0.self_attn.q_proj"
    float_amax = _input_amax(tiny_model, windows, [first])[first]
    other = build_like(tiny_model)
    progress = []
    stats = quantize_static_int8(tiny_model, windows, on_progress=lambda i, n: progress.append((i, n)),
                                 observer="max", smooth_alpha=None)
    assert progress == [(0, 2), (1, 2)]
    layers = int8_modules(tiny_model)
    assert len(layers) == 14 and all(m.mode == "static" for m in layers.values())
    # layer 0's inputs are those of the float model; max observer: act_scale = max |x| / 127
    assert float(layers[first].act_scale) * 127 == pytest.approx(float(float_amax.max()), rel=1e-6)
    for name, layer in layers.items():
        assert stats[name]["act_scale"] == float(layer.act_scale) and stats[name]["clipped"] == 0.0
    # later layers' q/k/v were calibrated on the outputs of the already quantized layers
    qkv = [n for n in layers if n.startswith("model.layers.1.self_attn.") and not n.endswith("o_proj")]
    seen = _input_amax(tiny_model, windows, qkv)
    for name in qkv:
        assert float(layers[name].act_scale) * 127 == pytest.approx(float(seen[name].max()), rel=1e-4)
    # different calibration data (other tokens), different scales
    quantize_static_int8(other, calib(2, low=192), observer="max", smooth_alpha=None)
    changed = [n for n in layers if float(layers[n].act_scale) != float(int8_modules(other)[n].act_scale)]
    assert len(changed) == 14


def _inputs(model, windows, name):
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
    with torch.no_grad():
        model(windows, use_cache=False)
    handle.remove()
    return torch.cat(seen).reshape(-1, seen[0].shape[-1])


def build_like(model):
    clone = type(model)(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def test_percentile_observer_clips(tiny_model):
    windows = calib(3, n=8, length=32)
    first = "model.layers.0.mlp.gate_proj"
    reference = build_like(tiny_model)
    amax = _input_amax(tiny_model, windows, [first])[first]
    stats = quantize_static_int8(tiny_model, windows, observer="percentile", percentile=90.0, batch_size=3,
                                 smooth_alpha=None)
    expected = float(torch.quantile(amax.double(), 0.9))
    assert observe(amax, "percentile", 90.0) == pytest.approx(expected)
    assert stats[first]["act_scale"] * 127 == pytest.approx(expected, rel=1e-5)
    assert stats[first]["clipped"] == pytest.approx(float((amax > expected).float().mean()), abs=1 / amax.numel())
    assert 0.05 < stats[first]["clipped"] <= 0.11
    # with smoothing: max over tokens and channels of |x_j| / m_j, m from the same inputs
    smoothed = quantize_static_int8(build_like(reference), windows, observer="max", smooth_alpha=0.5)
    x = _inputs(reference, windows, first)
    W = reference.get_submodule(first).weight
    m = smoothing_factors(x.abs().amax(0), W, 0.5)
    assert smoothed[first]["act_scale"] * 127 == pytest.approx(float((x.abs() / m).amax()), rel=1e-5)
    assert torch.allclose(reference.get_submodule(first).weight, W)
    with pytest.raises(ValueError, match="observer"):
        quantize_static_int8(build_tiny_llama(), windows, observer="mse")


@pytest.mark.parametrize("mode", ["dynamic", "static", "smooth"])
def test_save_load_round_trip_is_bit_exact(tiny_model, tiny_model_dir, tmp_path, mode):
    if mode == "dynamic":
        quantize_dynamic_int8(tiny_model)
    else:
        quantize_static_int8(tiny_model, calib(4), smooth_alpha=0.5 if mode == "smooth" else None)  # percentile
    smooth, mode = mode == "smooth", "static" if mode == "smooth" else mode
    expected = logits(tiny_model)
    out = save_model(tiny_model, tmp_path / "q32", tokenizer_dir=tiny_model_dir, float_dtype=torch.float32)
    meta = json.loads((out / "quantization.json").read_text())
    assert len(meta["modules"]) == 14
    assert all(v["kind"] == "int8" and v["mode"] == mode and v["scale_dtype"] == "float32" and v["smooth"] == smooth
               for v in meta["modules"].values())
    loaded = load_model(out)
    before, after = int8_modules(tiny_model), int8_modules(loaded)
    assert sorted(before) == sorted(after)
    for name, layer in before.items():
        for buf in ("qweight", "scales", "act_scale", "smooth"):
            a, b = getattr(layer, buf), getattr(after[name], buf)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (name, buf)
        assert after[name].mode == mode
    assert torch.equal(logits(loaded), expected)
    assert model_stats(loaded) == model_stats(tiny_model)
    # default export: other floats fp16, codes and scales as they are; reloads exactly
    half = save_model(loaded, tmp_path / "q16")
    stored = load_file(half / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.float16
    assert stored["model.layers.0.mlp.up_proj.qweight"].dtype == torch.int8
    assert stored["model.layers.0.mlp.up_proj.scales"].dtype == torch.float32
    assert ("model.layers.0.mlp.up_proj.act_scale" in stored) == (mode == "static")
    if smooth:
        assert stored["model.layers.0.mlp.up_proj.smooth"].dtype == torch.float32
    first, second = load_model(half), load_model(save_model(load_model(half), tmp_path / "again"))
    assert torch.equal(logits(first), logits(second))
    assert (logits(first) - expected).abs().max() <= 1e-2 * expected.abs().max()
    bf16 = load_model(half, dtype=torch.bfloat16)
    assert next(iter(int8_modules(bf16).values())).scales.dtype == torch.float32
    assert logits(bf16).dtype == torch.bfloat16


def test_int8_on_disk_size(tiny_model, tmp_path):
    n_linear = sum(m.weight.numel() for m in compressible_linears(tiny_model).values())
    n_out = sum(m.weight.shape[0] for m in compressible_linears(tiny_model).values())
    n_other = sum(p.numel() for p in tiny_model.parameters()) - n_linear
    quantize_dynamic_int8(tiny_model)
    size = (save_model(tiny_model, tmp_path / "q") / "model.safetensors").stat().st_size
    payload = n_linear + 4 * n_out + 2 * n_other
    assert payload <= size <= payload + 8192


def test_pruned_zeros_stay_zero(tiny_model, tmp_path):
    prune_magnitude(tiny_model, 0.5)
    pruned = {n: m.weight.detach() == 0 for n, m in compressible_linears(tiny_model).items()}
    sparsity = model_stats(tiny_model)["sparsity"]
    quantize_static_int8(tiny_model, calib(5))
    in_memory = model_stats(tiny_model)
    assert in_memory["sparsity"] >= sparsity == pytest.approx(0.5, abs=1e-4)
    loaded = load_model(save_model(tiny_model, tmp_path / "p"))
    assert model_stats(loaded) == in_memory
    for name, layer in int8_modules(loaded).items():
        assert layer.smooth is not None  # the default: percentile observer with smoothing
        assert (layer.qweight[pruned[name]] == 0).all(), name
        assert (layer.dequantize()[pruned[name]] == 0).all()
