"""Magnitude pruning: zero the smallest-|W| weights of every compressible linear layer.

Unstructured: per layer, exactly round(sparsity * W.numel()) weights are removed (Python
round, i.e. half to even); ties in |W| are broken by flat index (earlier goes first).
N:M: in every group of M consecutive input weights of a row the N largest |W| are kept
(ties: earlier index kept), so sparsity is (M - N) / M whatever `sparsity` says.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from frugalflow.arch import compressible_linears
from frugalflow.prune.wanda import check_n_m, nm_prune_mask


def magnitude_mask(W: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean mask of W's shape, True = keep."""
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(W.shape)}")
    score = W.detach().abs().float()
    if n_m is not None:
        check_n_m(n_m, W.shape[1])
        return ~nm_prune_mask(score, *n_m)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    k = int(round(sparsity * W.numel()))
    keep = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
    if k:
        flat = score.flatten()  # exactly k pruned: all below the k-th value, then its ties in flat order
        threshold = torch.kthvalue(flat, k).values
        below = flat < threshold
        ties = (flat == threshold).nonzero().squeeze(1)[: k - int(below.sum())]
        keep[below] = False
        keep[ties] = False
    return keep.reshape(W.shape)


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float,
                    n_m: tuple[int, int] | None = None) -> dict[str, dict[str, float]]:
    """In place over arch.compressible_linears; per layer the achieved share of exact zeros and
    the relative Frobenius error ||W - W_pruned|| / ||W||."""
    report = {}
    for name, layer in compressible_linears(model).items():
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"prune_magnitude: {name} is a {type(layer).__name__}; prune before quantizing")
        W = layer.weight
        keep = magnitude_mask(W, sparsity, n_m)
        W_norm = W.float().norm()
        removed_norm = W.float()[~keep].norm()
        W.masked_fill_(~keep, 0)
        report[name] = {
            "sparsity": (W == 0).sum().item() / W.numel(),
            "rel_error": (removed_norm / W_norm).item() if W_norm > 0 else 0.0,
        }
    return report


def run(stage, model_dir, out_dir, ctx):
    """Recipe entry (config.MagnitudePrune)."""
    from frugalflow.method import MethodResult, errors_as, float_model, save

    model, _ = float_model(model_dir, ctx["device"])
    layers = errors_as(prune_magnitude(model, stage.sparsity, stage.n_m), "rel_error")
    save(model, out_dir, model_dir)
    return MethodResult({"layers": layers}, {"sparsity": {n: s["sparsity"] for n, s in layers.items()}})
