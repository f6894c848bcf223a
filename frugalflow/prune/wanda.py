"""Wanda pruning (Sun et al. 2023): drop the weights with the smallest |W_ij| * ||X_j||_2.

Scores are compared within each output row (the paper's comparison group); N:M keeps
the n best-scoring weights of every m consecutive inputs of a row (as magnitude.py: 2:4
keeps 2 of 4; `sparsity` is then ignored). Unstructured sparsity is exact per layer:
round(out * in * sparsity) weights are zeroed, spread over rows by `prune_counts`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from frugalflow.arch import arch_of
from frugalflow.calibration import input_groups, relative_error, run_sequential


def prune_counts(rows: int, cols: int, sparsity: float, device=None) -> torch.Tensor:
    """Weights to zero in each row so that the layer total is exactly round(rows * cols * sparsity)."""
    total = int(round(rows * cols * sparsity))
    counts = torch.full((rows,), total // rows, dtype=torch.long, device=device)
    counts[: total % rows] += 1
    return counts


def check_n_m(n_m: tuple[int, int] | None, cols: int) -> None:
    if n_m is None:
        return
    n, m = n_m
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    if cols % m:
        raise ValueError(f"in_features {cols} is not a multiple of M={m} for {n}:{m} pruning")


def nm_prune_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask, True where pruned: all but the n highest scores of every m consecutive columns
    (ties: the earlier column is kept). The one N:M rule of magnitude, Wanda and SparseGPT."""
    rows, cols = score.shape
    grouped = score.reshape(rows, cols // m, m)
    order = torch.argsort(grouped, dim=-1, descending=True, stable=True)
    pruned = torch.ones_like(grouped, dtype=torch.bool).scatter_(-1, order[..., :n], False)
    return pruned.reshape(rows, cols)


def row_prune_mask(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask, True where pruned: the counts[r] lowest scores of each row r."""
    order = torch.argsort(score, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(score.shape[1], device=score.device)
                                            .expand_as(order).contiguous())
    return rank < counts.unsqueeze(1)


@torch.no_grad()
def wanda_mask(W: torch.Tensor, x_norm: torch.Tensor, sparsity: float,
               n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask (True = kept) from the Wanda score |W_ij| * ||X_j||_2."""
    check_n_m(n_m, W.shape[1])
    score = W.float().abs() * x_norm.float().reshape(1, -1)
    if n_m is not None:
        return ~nm_prune_mask(score, *n_m)
    return ~row_prune_mask(score, prune_counts(*W.shape, sparsity, device=W.device))


def prune_wanda(model: nn.Module, calib_windows: torch.Tensor, sparsity: float | Sequence[float],
                n_m: tuple[int, int] | None = None, device: str = "cpu",
                on_progress: Callable[[int, int], None] | None = None,
                batch_size: int = 8, recon_stride: int = 8) -> dict[str, dict]:
    """Prune every decoder linear in place; per linear {"sparsity", "recon_error"}. `sparsity`: one
    for every decoder layer, or one per layer (OWL's layer-wise sparsities, owl.py).

    recon_error = ||W X - W' X||^2 / ||W X||^2 over the calibration inputs, from H built on
    every `recon_stride`-th token (1: exact; the default 8 makes it cheap next to the forward
    passes, which are all Wanda needs).
    """
    arch = arch_of(model)

    def solve(i, layer, stats):
        out = {}
        target = sparsity if isinstance(sparsity, (int, float)) else sparsity[i]
        for group in input_groups(arch):
            st = stats[group[0]]
            for name in group:
                lin = layer.get_submodule(name)
                W = lin.weight.data.float()
                keep = wanda_mask(W, st["x_norm"], target, n_m)
                W_new = W * keep
                out[name] = {"sparsity": 1.0 - keep.float().mean().item(),
                             "recon_error": relative_error(W, W_new, st["H"])}
                lin.weight.data.copy_(W_new.to(lin.weight.dtype))
        return out

    return run_sequential(model, calib_windows, solve, needs=("H", "x_norm"), device=device,
                          batch_size=batch_size, on_progress=on_progress, h_stride=recon_stride)


def run(stage, model_dir, out_dir, ctx):
    """Recipe entry (config.WandaPrune)."""
    from frugalflow.method import MethodResult, float_model, layer_progress, save

    model, _ = float_model(model_dir, ctx["device"])
    layers = prune_wanda(model, ctx["calib"](), stage.sparsity, stage.n_m, device=ctx["device"],
                         on_progress=layer_progress(ctx, "wanda"))
    save(model, out_dir, model_dir)
    return MethodResult({"layers": layers}, {"sparsity": {n: s["sparsity"] for n, s in layers.items()}})
