"""Round-to-nearest group-wise weight quantization: the grid every weight method shares.

W has shape [out, in]; groups run along `in` (group_size=-1: one group per row).
Asymmetric: q in [0, 2^bits - 1], W ~ (q - zero) * scale, zero an integer.
Symmetric:  zero fixed at 2^(bits-1), scale = max|W| / (2^(bits-1) - 1), stored the same
way, so packing and kernels see one format. Either way a zero weight maps exactly to
q = zero, so a pruned weight stays zero after quantization.
"""
from __future__ import annotations

import torch


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


def _grid(extremes: tuple[torch.Tensor, ...], bits: int, symmetric: bool,
          clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2**bits - 1
    if symmetric:
        scale = (extremes[0] * clip_ratio / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        wmin, wmax = extremes[0] * clip_ratio, extremes[1] * clip_ratio
        scale = ((wmax - wmin) / qmax).clamp(min=1e-8)
        zero = torch.round(-wmin / scale).clamp(0, qmax)
    return scale, zero


def compute_qparams(W: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero), each [out, n_groups] float32; zero holds integer values."""
    return _grid(_extremes(_grouped(W.float(), group_size), symmetric), bits, symmetric, clip_ratio)


def search_qparams(W: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor, n_grid: int = 20,
                   max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [rows, 1] of one group W [rows, g]: each row's range shrunk by the factor in
    1, 1 - max_shrink / n_grid, ..., 1 - max_shrink whose rounding error sum_j importance_j (w_j - q_j)^2
    is least (the full range when nothing beats it)."""
    W = W.float()
    extremes = _extremes(W.unsqueeze(1), symmetric)
    best = None  # (error, scale, zero) per row
    q = torch.empty_like(W)
    for i in range(n_grid + 1):
        scale, zero = _grid(extremes, bits, symmetric, 1.0 - max_shrink * i / n_grid)
        torch.div(W, scale, out=q).add_(zero).round_().clamp_(0, 2**bits - 1)
        err = q.sub_(zero).mul_(scale).sub_(W).square_().mul_(importance).sum(1)  # in place: one buffer
        if best is None:
            best = (err, scale, zero)
        else:
            better = err < best[0]
            for kept, found in zip(best, (err, scale, zero)):
                kept[better] = found[better]
    return best[1], best[2]


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
                write_back: bool = False) -> tuple[dict, dict]:
    """RTN of every named linear: ({name: (q, scale, zero)} on the CPU, {name: relative weight error}).

    `write_back`: replace each weight by its dequantized value (the model then computes as packed)."""
    qparams, errors = {}, {}
    for name, lin in linears.items():
        W = lin.weight.data.float()
        scale, zero = compute_qparams(W, bits, group_size, symmetric)
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
    qparams, errors = rtn_linears(compressible_linears(model), stage.bits, stage.group_size, stage.symmetric)
    pack.quantize_model(model, qparams, stage.bits, stage.group_size)
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
