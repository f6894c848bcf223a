"""Packed storage and QuantLinear: exact round trips, byte layout, kernels vs naive matmul."""
from __future__ import annotations

import math

import pytest
import torch

from frugalflow.arch import compressible_linears
from frugalflow.quant.pack import (
    QuantLinear,
    dequantize_model,
    pack_codes,
    quantization_meta,
    quantize_model,
    quantized_modules,
    unpack_codes,
)
from frugalflow.quant.rtn import compute_qparams, dequantize, quantize


def _codes(W, bits, group_size, symmetric=False):
    scale, zero = compute_qparams(W, bits, group_size, symmetric)
    return quantize(W, scale, zero, bits, group_size), scale, zero


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 13), (4, 64), (2, 33), (7, 100)])
def test_pack_round_trip_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    q = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], math.ceil(shape[1] * bits / 8))
    assert torch.equal(unpack_codes(packed, bits, shape[1]), q)


def test_pack_extreme_codes_round_trip():
    for bits in range(2, 9):
        q = torch.tensor([[0, 2**bits - 1] * 9], dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(q, bits), bits, q.shape[1]), q)


def test_pack_layout_is_little_endian():
    assert pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    # 3 bits: codes 5, 6, 7 -> bitstream 101 011 111 (LSB first) -> 0b11_110_101, 0b1
    assert pack_codes(torch.tensor([[5, 6, 7]], dtype=torch.uint8), 3).tolist() == [[5 | 6 << 3 | (7 << 6) & 255, 1]]
    assert pack_codes(torch.tensor([[200, 7]], dtype=torch.uint8), 8).tolist() == [[200, 7]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(torch.tensor([[16]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(2, 2, dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


CASES = [  # bits, group_size, out, in, symmetric, expected path
    (4, 32, 48, 64, False, "int4"),
    (4, 64, 32, 128, True, "int4"),
    (4, 128, 16, 256, False, "int4"),
    (4, -1, 32, 96, False, "int4"),  # per-channel: group params repeated onto 32-wide kernel groups
    (4, 32, 20, 64, False, "dequant"),  # out % 16 != 0: the kernel refuses it
    (8, -1, 48, 64, True, "int8"),
    (8, -1, 40, 96, False, "int8"),  # asymmetric: rank-1 zero-point correction
    (8, 32, 16, 64, False, "dequant"),
    (3, 32, 24, 64, False, "dequant"),
    (2, -1, 8, 40, True, "dequant"),
]


@pytest.mark.parametrize("bits,group_size,out_f,in_f,symmetric,path", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1, 1), (2, 5), (3,)])
def test_quantlinear_matches_naive_dequantized_matmul(bits, group_size, out_f, in_f, symmetric, path, dtype, lead):
    torch.manual_seed(bits + out_f + in_f)
    W = torch.randn(out_f, in_f) * 0.05
    bias = torch.randn(out_f) * 0.1
    q, scale, zero = _codes(W, bits, group_size, symmetric)
    layer = QuantLinear.from_codes(q, scale, zero, bits, group_size, bias=bias)
    assert layer.kernel_path() == path
    W_deq = dequantize(q, layer.scales.float(), zero, group_size)  # the grid the layer stores (fp16 scales)
    assert torch.equal(layer.dequantize(), W_deq)
    x = torch.randn(*lead, in_f).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    ref = x.double() @ W_deq.double().T + bias.double()
    err = (y.double() - ref).abs().max().item()
    exact = path == "dequant" and dtype == torch.float32
    assert err <= (1e-5 if exact else 2e-2) * ref.abs().max().item(), err
    if path == "int4":
        assert "int4" in layer._cache  # the integer kernel really ran
    if path == "int8" and x.numel() // in_f <= 4:
        assert "int8" in layer._cache


def test_int4_kernel_tensors_built_once_and_refreshed_on_load():
    torch.manual_seed(0)
    W1, W2 = torch.randn(32, 64), torch.randn(32, 64)
    layer = QuantLinear.from_codes(*_codes(W1, 4, 32), bits=4, group_size=32)
    other = QuantLinear.from_codes(*_codes(W2, 4, 32), bits=4, group_size=32)
    x = torch.randn(1, 64)
    layer(x)
    cached = layer._cache["int4"][0]
    layer(x)
    assert layer._cache["int4"][0] is cached
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))


def test_to_dtype_keeps_stored_scales():
    torch.manual_seed(0)
    layer = QuantLinear.from_codes(*_codes(torch.randn(32, 64), 4, 32), bits=4, group_size=32,
                                   bias=torch.randn(32))
    scales = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert layer.bias.dtype == torch.bfloat16


def _quantize_tiny(model, bits=4, group_size=32, symmetric=False):
    qparams = {name: _codes(m.weight.data, bits, group_size, symmetric)
               for name, m in compressible_linears(model).items()}
    return quantize_model(model, qparams, bits, group_size, symmetric=symmetric), qparams


def test_quantize_and_dequantize_model(tiny_model):
    ids = torch.arange(12).reshape(1, 12)
    model, qparams = _quantize_tiny(tiny_model)
    layers = quantized_modules(model)
    assert set(layers) == set(compressible_linears(model)) and len(layers) == 14
    for name, (q, scale, zero) in qparams.items():
        assert torch.equal(layers[name].codes(), q)
        assert torch.equal(layers[name].zeros, zero.to(torch.uint8))
    meta = quantization_meta(model)
    assert (meta["bits"], meta["group_size"], meta["symmetric"]) == (4, 32, False)
    assert set(meta["modules"]) == set(qparams)
    with torch.no_grad():
        logits_q = model(ids).logits
        expected = {name: layers[name].dequantize() for name in layers}
        dequantize_model(model)
        assert not quantized_modules(model)
        for name, m in compressible_linears(model).items():
            assert isinstance(m, torch.nn.Linear) and torch.equal(m.weight, expected[name])
        logits_d = model(ids).logits
    assert (logits_q - logits_d).abs().max() <= 3e-2 * logits_d.abs().max()


def test_quantize_model_rejects_bad_names(tiny_model):
    q = torch.zeros(64, 64, dtype=torch.uint8)
    s, z = torch.ones(64, 2), torch.zeros(64, 2)
    with pytest.raises(ValueError, match="no module"):
        quantize_model(tiny_model, {"model.layers.9.mlp.up_proj": (q, s, z)}, 4, 32)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        quantize_model(tiny_model, {"model.norm": (q, s, z)}, 4, 32)


def test_dense_copy_keeps_one_dtype_and_leaves_the_kernel_tables():
    """On a GPU long inputs use a dense copy and one-row decode the int4 tables: building the copy
    must not drop the tables (each generate would repack every layer) nor keep a copy per dtype."""
    torch.manual_seed(0)
    layer = QuantLinear.from_codes(*_codes(torch.randn(32, 64), 4, 32), bits=4, group_size=32)
    layer(torch.randn(1, 64))
    tables = layer._cache["int4"]
    for dtype in (torch.float32, torch.bfloat16):
        dense = layer._dense_weight(dtype)
        assert dense.dtype == dtype and torch.equal(dense, layer.dequantize(dtype))
    assert layer._cache["int4"] is tables and layer._cache["cpu"] == "int4"
    assert layer._cache["dense"][0] == torch.bfloat16 and sum(k == "dense" for k in layer._cache) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("group_size,out_f,in_f", [(64, 576, 576), (32, 1536, 576), (128, 576, 1536)])
def test_int4_cuda_kernel_matches_naive(group_size, out_f, in_f, monkeypatch):
    """On a GPU, packed int4 runs torch's tinygemm int4 kernel (here forced for small layers too)."""
    import time

    import frugalflow.quant.pack as pack

    monkeypatch.setattr(pack, "INT4_CUDA_MIN_WEIGHTS", 0)
    monkeypatch.setattr(pack, "INT4_CUDA_MAX_ROWS", 1 << 20)

    torch.manual_seed(out_f + in_f)
    W = torch.randn(out_f, in_f) * 0.05
    q, scale, zero = _codes(W, 4, group_size)
    layer = QuantLinear.from_codes(q, scale, zero, 4, group_size).cuda()
    assert layer.kernel_path("cuda") == "int4_cuda"
    W_deq = layer.dequantize(torch.bfloat16)
    for rows in (1, 7, 64):
        x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
        expected = (x.float() @ W_deq.float().T)
        got = layer(x).float()
        assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2), (got - expected).abs().max()
    assert "int4_cuda" in layer._cache and "dense" not in layer._cache  # no dense copy
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)

    def timed(fn):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 200

    t_int4 = timed(lambda: layer(x))
    t_bf16 = timed(lambda: torch.nn.functional.linear(x, W_deq))
    print(f"int4 {t_int4 * 1e6:.1f} us, bf16 {t_bf16 * 1e6:.1f} us for {out_f}x{in_f}")


@pytest.mark.parametrize("fmt", ["int4-g32", "int3-channel", "int8-dynamic", "int8-static-smoothed"])
def test_weight_grid_rebuilds_the_weight_each_format_applies(fmt):
    """The one view exporters take of any packed linear: W = scales * (codes - zeros), per group (or
    scales * codes for signed codes), and the input quantization where there is one."""
    from frugalflow.quant.int8 import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8)
    if fmt.startswith(("int4", "int3")):
        bits, group = (4, 32) if fmt == "int4-g32" else (3, -1)
        scale, zero = compute_qparams(linear.weight.data, bits, group, symmetric=bits == 3)
        layer = QuantLinear.from_codes(quantize(linear.weight.data, scale, zero, bits, group), scale, zero, bits, group)
    else:
        static = fmt == "int8-static-smoothed"
        layer = Int8Linear.from_linear(linear, "static" if static else "dynamic", act_scale=0.05 if static else None,
                                       smooth=torch.rand(64) + 0.5 if static else None)
    grid = layer.weight_grid()
    scales = grid.scales.float().repeat_interleave(grid.group, dim=1)
    if grid.zeros is None:
        W = scales * grid.codes.float()
    else:
        W = scales * (grid.codes.float() - grid.zeros.float().repeat_interleave(grid.group, dim=1))
    if fmt == "int8-static-smoothed":  # the grid holds W * smooth; the layer divides its inputs by smooth
        assert grid.act == {"mode": "static", "scale": layer.act_scale, "smoothed": True}
        W = W / layer.smooth
    else:
        assert (grid.act is None) == fmt.startswith(("int4", "int3"))
    assert torch.allclose(W, layer.dequantize(torch.float32), atol=1e-6)
    assert grid.symmetric == (grid.zeros is None or bool((grid.zeros == 2 ** (grid.bits - 1)).all()))
    assert grid.group == (64 if grid.group_size == -1 else grid.group_size)


def _log8_codes(W, bits=4, group_size=32, symmetric=False):
    from frugalflow.quant.rtn import log8_offset

    scale, zero = compute_qparams(W, bits, group_size, symmetric, log8_offset=log8_offset(W, bits))
    return quantize(W, scale, zero, bits, group_size), scale, zero


def test_log8_scales_are_one_byte_per_group_and_decode_exactly():
    """log8: each scale is 2^(k/16) for an integer k, stored as a byte plus one offset per layer: w4 g32
    asymmetric takes 4.5 bits per weight (plus 32 per layer), and the layer computes with exactly the
    scales the quantizer chose."""
    torch.manual_seed(0)
    W = torch.randn(576, 576) * torch.rand(576, 1)
    q, scale, zero = _log8_codes(W)
    k = torch.round(torch.log2(scale) * 16)
    assert torch.equal(torch.exp2(k / 16), scale) and int(k.max() - k.min()) <= 255
    layer = QuantLinear.from_codes(q, scale, zero, bits=4, group_size=32, scale_dtype="log8")
    assert set(layer.state_dict()) == {"qweight", "scale_codes", "scale_offset", "zeros"}
    assert layer.scale_codes.dtype == torch.uint8 and torch.equal(layer.scales, scale)
    assert layer.storage_bits() == 576 * 576 * 4.5 + 32
    fp16 = QuantLinear.from_codes(*_codes(W, 4, 32), bits=4, group_size=32)
    assert fp16.storage_bits() == 576 * 576 * 4.75
    # rounding the scales up to the grid costs little: the weight error stays within 5% of float16 scales'
    err = (dequantize(q, scale, zero, 32) - W).norm()
    assert err <= 1.05 * (fp16.dequantize() - W).norm()
    assert torch.equal(layer.dequantize(), dequantize(q, scale, zero, 32))
    layer.to(torch.bfloat16)
    assert torch.equal(layer.scales, scale) and layer.scale_offset.dtype == torch.int32
    assert quantization_meta(quantize_model(torch.nn.Sequential(torch.nn.Linear(576, 576)),
                                            {"0": (q, scale, zero)}, 4, 32, scale_dtype="log8")
                             )["modules"]["0"]["scale_dtype"] == "log8"


def test_log8_rejects_scales_off_its_grid():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    with pytest.raises(ValueError, match="not on the log8 grid"):
        QuantLinear.from_codes(*_codes(W, 4, 32), bits=4, group_size=32, scale_dtype="log8")
    wide = torch.exp2(torch.tensor([[0.0, 300 / 16]]).expand(32, 2).contiguous())
    with pytest.raises(ValueError, match="one byte holds 256"):
        QuantLinear.from_codes(torch.zeros(32, 64, dtype=torch.uint8), wide, torch.zeros(32, 2), bits=4,
                               group_size=32, scale_dtype="log8")
    with pytest.raises(ValueError, match="expected 'log8' or a float dtype"):
        QuantLinear(64, 32, 4, 32, scale_dtype="int8")


def test_log8_offset_leaves_room_and_clamps():
    """The grid's top is at least twice the largest scale W's own grid takes; tiny scales clamp up to the
    bottom (their groups still map a zero weight to its zero point)."""
    from frugalflow.quant.rtn import log8_offset, snap_log8

    torch.manual_seed(0)
    W = torch.randn(16, 64)
    W[0, :32] = 0  # an all-zero group
    W[1, :32] *= 1e-9  # a group far below the others
    offset = log8_offset(W, 4)
    scale, zero = compute_qparams(W, 4, 32, False, log8_offset=offset)
    top = 2 ** ((offset + 255) / 16)
    assert scale.max() * 2 <= top
    assert scale[0, 0] == scale[1, 0] == 2 ** (offset / 16)
    assert quantize(W, scale, zero, 4, 32)[0, :32].eq(zero[0, 0]).all()
    assert torch.equal(snap_log8(scale, offset), scale)  # already on the grid: unchanged


def test_log8_is_refused_where_it_cannot_apply():
    from frugalflow.config import RecipeError
    from frugalflow.recipe_io import recipe_from_dict

    with pytest.raises(RecipeError, match="scale_format needs stream: false"):
        recipe_from_dict({"stages": [{"method": "gptq", "scale_format": "log8", "stream": True}]})
    with pytest.raises(RecipeError, match="scale_format"):
        recipe_from_dict({"stages": [{"method": "rtn", "scale_format": "log4"}]})
