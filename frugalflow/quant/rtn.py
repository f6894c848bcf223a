"""Round-to-nearest group-wise weight quantization: the grid every weight method shares.

W has shape [out, in]; groups run along `in` (group_size=-1: one group per row).
Asymmetric: q in [0, 2^bits - 1], W ~ (q - zero) * scale, zero an integer.
Symmetric:  zero fixed at 2^(bits-1), scale = max|W| / (2^(bits-1) - 1), stored the same
way, so packing and kernels see one format. Either way a zero weight maps exactly to
q = zero, so a pruned weight stays zero after quantization.
log8 scales (`log8_offset` given): each scale rounded up onto 2^(k / 16), k an integer in
offset .. offset + 255, so that it is stored as one byte per group (pack.py) instead of 16 bits.
"""
from __future__ import annotations

import math

import torch

LOG8 = "log8"  # the scale format of one byte per group: scale = 2^((code + offset) / LOG8_STEPS)
LOG8_STEPS = 16  # log8 codes per octave: neighbouring scales 4.4% apart; 256 codes span 16 octaves
SEARCH_CHUNK_ELEMENTS = 1 << 22  # search_qparams' candidates per pass: about this many floats per buffer


def _grouped(W: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = W.shape
    g = in_features if group_size == -1 else group_size
    if in_features % g:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {g}")
    return W.reshape(out_features, in_features // g, g)


def _extremes(Wg: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """What a group's grid is computed from: (max|w|,) when symmetric, else (min(w, 0), max(w, 0))."""
    if symmetric:
        return (Wg.abs().amax(dim=-1),)
    return Wg.amin(dim=-1).clamp(max=0), Wg.amax(dim=-1).clamp(min=0)


def log8_offset(W: torch.Tensor, bits: int) -> int:
    """The lowest log8 exponent k of W's scales: 255 steps below 4 max|W| / (2^bits - 1), which is at
    least twice the largest scale a group of W can take (room for GPTQ's updates of later columns);
    a scale beyond the top is clamped to it (that group's range clipped)."""
    top = 4 * float(W.abs().max()) / (2**bits - 1)
    return math.ceil(LOG8_STEPS * math.log2(max(top, 1e-30))) - 255


def snap_log8(scale: torch.Tensor, offset: int) -> torch.Tensor:
    """Scales rounded up onto 2^(k / 16), k in offset .. offset + 255 (up: the group's range still fits;
    a scale already on the grid stays)."""
    k = torch.ceil(torch.log2(scale) * LOG8_STEPS - 1e-3).clamp_(offset, offset + 255)
    return torch.exp2(k / LOG8_STEPS)


def log8_codes(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(codes uint8, offset) with scale == 2^((codes + offset) / 16) exactly; ValueError when `scale`
    is not on that grid or spans more than 256 steps."""
    k = torch.round(torch.log2(scale.float()) * LOG8_STEPS)
    if not torch.equal(torch.exp2(k / LOG8_STEPS), scale.float()):
        raise ValueError("scales are not on the log8 grid 2^(k / 16) (compute them with a log8_offset)")
    offset = int(k.min()) if k.numel() else 0
    if k.numel() and int(k.max()) - offset > 255:
        raise ValueError(f"scales span {int(k.max()) - offset + 1} log8 steps, one byte holds 256")
    return (k - offset).to(torch.uint8), offset


def _grid(extremes: tuple[torch.Tensor, ...], bits: int, symmetric: bool,
          clip_ratio: float | torch.Tensor = 1.0, log8_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2**bits - 1
    if symmetric:
        scale = (extremes[0] * clip_ratio / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
    else:
        wmin, wmax = extremes[0] * clip_ratio, extremes[1] * clip_ratio
        scale = ((wmax - wmin) / qmax).clamp(min=1e-8)
    if log8_offset is not None:
        scale = snap_log8(scale, log8_offset)
    zero = torch.full_like(scale, 2 ** (bits - 1)) if symmetric else torch.round(-wmin / scale).clamp(0, qmax)
    return scale, zero


def compute_qparams(W: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    clip_ratio: float | torch.Tensor = 1.0,
                    log8_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero), each [out, n_groups] float32; zero holds integer values."""
    return _grid(_extremes(_grouped(W.float(), group_size), symmetric), bits, symmetric, clip_ratio, log8_offset)


def search_qparams(W: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor, n_grid: int = 20,
                   max_shrink: float = 0.5, log8_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [rows, 1] of one group W [rows, g]: each row's range shrunk by the factor in
    1, 1 - max_shrink / n_grid, ..., 1 - max_shrink whose rounding error sum_j importance_j (w_j - q_j)^2
    is least (the first such factor on ties, so the full range when nothing beats it). The candidates
    are evaluated together, SEARCH_CHUNK_ELEMENTS floats at a time."""
    W = W.float()
    extremes = tuple(e.unsqueeze(0) for e in _extremes(W.unsqueeze(1), symmetric))  # [1, rows, 1] each
    ratios = [1.0 - max_shrink * i / n_grid for i in range(n_grid + 1)]
    per_chunk = max(1, SEARCH_CHUNK_ELEMENTS // max(W.numel(), 1))
    best = None  # (error, scale, zero) per row
    for c0 in range(0, len(ratios), per_chunk):
        ratio = torch.tensor(ratios[c0:c0 + per_chunk], device=W.device).view(-1, 1, 1)
        scale, zero = _grid(extremes, bits, symmetric, ratio, log8_offset)  # [chunk, rows, 1]
        q = (W / scale).add_(zero).round_().clamp_(0, 2**bits - 1)
        err = q.sub_(zero).mul_(scale).sub_(W).square_().mul_(importance).sum(-1)  # [chunk, rows]
        err, pick = err.min(0)  # the first minimum
        found = (err, *(t.squeeze(-1).gather(0, pick.unsqueeze(0)).squeeze(0) for t in (scale, zero)))
        if best is None:
            best = found
        else:
            better = found[0] < best[0]
            for kept, new in zip(best, found):
                kept[better] = new[better]
    return best[1].unsqueeze(-1), best[2].unsqueeze(-1)


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes q (uint8, shape of W) for the given per-group grid."""
    Wg = _grouped(W.float(), group_size)
    q = torch.round(Wg / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 2**bits - 1)
    return q.reshape(W.shape).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qg = _grouped(q.float(), group_size)
    W = (qg - zero.unsqueeze(-1).float()) * scale.unsqueeze(-1).float()
    return W.reshape(q.shape).to(dtype)


def fake_quantize(W: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """W rounded onto its own RTN grid, in W's dtype (no straight-through; see distill for STE);
    the values dequantize(quantize(W)) gives, computed in place."""
    Wg = _grouped(W.float(), group_size)
    scale, zero = _grid(_extremes(Wg, symmetric), bits, symmetric)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (Wg / s).add_(z).round_().clamp_(0, 2**bits - 1).sub_(z).mul_(s).reshape(W.shape).to(W.dtype)


@torch.no_grad()
def rtn_linears(linears: dict, bits: int, group_size: int, symmetric: bool,
                write_back: bool = False, scale_format: str = "float16") -> tuple[dict, dict]:
    """RTN of every named linear: ({name: (q, scale, zero)} on the CPU, {name: relative weight error}).

    `write_back`: replace each weight by its dequantized value (the model then computes as packed).
    `scale_format` LOG8: the scales on each linear's log8 grid."""
    qparams, errors = {}, {}
    for name, lin in linears.items():
        W = lin.weight.data.float()
        offset = log8_offset(W, bits) if scale_format == LOG8 else None
        scale, zero = compute_qparams(W, bits, group_size, symmetric, log8_offset=offset)
        q = quantize(W, scale, zero, bits, group_size)
        W_q = dequantize(q, scale, zero, group_size)
        errors[name] = float((W - W_q).norm() / W.norm().clamp(min=1e-12))
        if write_back:
            lin.weight.data.copy_(W_q.to(lin.weight.dtype))
        qparams[name] = (q.cpu(), scale.cpu(), zero.cpu())
    return qparams, errors


def run(stage, model_dir, out_dir, ctx):
    """Recipe entry (config.RTNQuant): RTN every compressible linear and store it packed (or stream it)."""
    from frugalflow.arch import compressible_linears
    from frugalflow.method import ERROR_KEY, float_model, save
    from frugalflow.quant import pack

    if stage.stream:
        from frugalflow.streaming import run_streaming

        return run_streaming(stage, model_dir, out_dir, ctx)
    model, _ = float_model(model_dir, ctx["device"])
    qparams, errors = rtn_linears(compressible_linears(model), stage.bits, stage.group_size, stage.symmetric,
                                  scale_format=stage.scale_format)
    pack.quantize_model(model, qparams, stage.bits, stage.group_size, scale_dtype=stage.scale_format)
    if stage.head_bits is not None:
        pack.quantize_head(model, stage.head_bits)
    save(model, out_dir, model_dir)
    return _result({n: {ERROR_KEY: e} for n, e in errors.items()}, qparams)


def grid_summary(qparams: dict) -> dict:
    """Small per-linear summary of chosen grids: groups, mean |scale|, mean zero point."""
    return {name: {"groups": int(scale.numel()), "scale_mean": float(scale.float().abs().mean()),
                   "zero_mean": float(zero.float().mean())} for name, (_q, scale, zero) in qparams.items()}


def _result(layers: dict, qparams: dict):
    from frugalflow.method import MethodResult

    return MethodResult({"layers": layers}, {"grids": grid_summary(qparams)})
