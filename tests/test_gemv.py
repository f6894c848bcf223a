"""The few-row packed kernel (gemv.cpp): built here, the stored grid's products in float32 for every
weight it takes, several weights side by side, clear refusals, and torch's kernels where it cannot be built."""
from __future__ import annotations

import logging

import pytest
import torch

from frugalflow.quant import gemv
from frugalflow.quant.pack import QuantLinear, pack_codes
from frugalflow.quant.rtn import compute_qparams, dequantize, quantize


def _packed(out_f, in_f, bits, group, scale_dtype, seed):
    torch.manual_seed(seed)
    W = torch.randn(out_f, in_f) * 0.05
    scale, zero = compute_qparams(W, bits, group, False)
    q = quantize(W, scale, zero, bits, group)
    scale = scale.to(scale_dtype)
    W_deq = dequantize(q, scale.float(), zero, group)
    return pack_codes(q, bits), scale.contiguous(), zero.to(torch.uint8).contiguous(), W_deq


@pytest.fixture(scope="module")
def built():
    module = gemv.kernels()
    assert module is not None, "gemv.cpp did not build on this machine (see the warning logged)"
    return module


@pytest.mark.parametrize("bits,group,in_f", [(4, 32, 96), (4, 64, 576), (4, 128, 256), (4, -1, 160),
                                             (8, -1, 576), (8, 16, 48), (8, 64, 128)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_products_match_the_dequantized_weights(built, bits, group, in_f, scale_dtype, rows):
    g = in_f if group == -1 else group
    assert gemv.fits(bits, g, in_f)
    parts = [_packed(out_f, in_f, bits, group, scale_dtype, seed) for seed, out_f in enumerate((40, 17, 64))]
    x = torch.randn(rows, in_f)
    y = gemv.packed_gemv(x, *[[p[i] for p in parts] for i in range(3)], bits, g)
    ref = x.double() @ torch.cat([p[3] for p in parts]).double().T
    assert y.dtype == torch.float32 and y.shape == (rows, 40 + 17 + 64)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # each weight alone gives its columns of the side-by-side result, bit for bit
    alone = gemv.packed_gemv(x, [parts[1][0]], [parts[1][1]], [parts[1][2]], bits, g)
    assert torch.equal(alone, y[:, 40:57])
    yb = gemv.packed_gemv(x.bfloat16(), *[[p[i] for p in parts] for i in range(3)], bits, g)
    assert yb.dtype == torch.bfloat16
    assert (yb.double() - ref.to(torch.bfloat16).double()).abs().max() <= 2e-2 * ref.abs().max()


def test_refuses_what_it_does_not_take(built):
    q, s, z, _ = _packed(32, 64, 4, 32, torch.float16, 0)
    with pytest.raises(RuntimeError, match="1..8 rows"):
        gemv.packed_gemv(torch.randn(9, 64), [q], [s], [z], 4, 32)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        gemv.packed_gemv(torch.randn(1, 64, dtype=torch.float64), [q], [s], [z], 4, 32)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        gemv.packed_gemv(torch.randn(1, 64), [q], [s], [z], 4, 16)
    with pytest.raises(RuntimeError, match="qweight 0"):
        gemv.packed_gemv(torch.randn(1, 96), [q], [s], [z], 4, 32)
    assert not gemv.fits(3, 32, 64) and not gemv.fits(4, 16, 64) and not gemv.fits(8, 8, 64)
    assert not gemv.takes(torch.randn(9, 64)) and not gemv.takes(torch.randn(1, 64, requires_grad=True))
    assert not gemv.takes(torch.randn(1, 64, dtype=torch.float16)) and gemv.takes(torch.randn(8, 64))


def test_a_failed_build_falls_back_to_torchs_kernels(monkeypatch, caplog):
    monkeypatch.setattr(gemv, "_state", {})
    monkeypatch.setattr(gemv, "_build", lambda: (_ for _ in ()).throw(OSError("no compiler here")))
    with caplog.at_level(logging.WARNING, logger=gemv.__name__):
        assert gemv.kernels() is None and gemv.kernels() is None
    assert sum("no compiler here" in r.getMessage() for r in caplog.records) == 1  # logged once
    torch.manual_seed(0)
    W = torch.randn(32, 64) * 0.05
    scale, zero = compute_qparams(W, 4, 32, False)
    layer = QuantLinear.from_codes(quantize(W, scale, zero, 4, 32), scale, zero, 4, 32)
    x = torch.randn(1, 64)
    ref = x @ layer.dequantize().T
    assert (layer(x) - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert layer._cache["gemv"] is None and "int4" in layer._cache  # torch's int4 kernel ran


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setattr(gemv, "_state", {})
    monkeypatch.setenv("FRUGALFLOW_GEMV", "0")
    assert gemv.kernels() is None
