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


def compute_qparams(W: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero), each [out, n_groups] float32; zero holds integer values."""
    Wg = _grouped(W.float(), group_size)
    qmax = 2**bits - 1
    if symmetric:
        amax = Wg.abs().amax(dim=-1) * clip_ratio
        scale = (amax / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        wmin = (Wg.amin(dim=-1).clamp(max=0)) * clip_ratio
        wmax = (Wg.amax(dim=-1).clamp(min=0)) * clip_ratio
        scale = ((wmax - wmin) / qmax).clamp(min=1e-8)
        zero = torch.round(-wmin / scale).clamp(0, qmax)
    return scale, zero


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
    """W rounded onto its own RTN grid, in W's dtype (no straight-through; see distill for STE)."""
    scale, zero = compute_qparams(W, bits, group_size, symmetric)
    return dequantize(quantize(W, scale, zero, bits, group_size), scale, zero, group_size, W.dtype)

