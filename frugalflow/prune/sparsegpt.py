"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS updates of the kept weights.

Columns are processed left to right in blocks. Hinv is the upper Cholesky factor of the
dampened inverse Hessian; pruning column i sets the pruned entries to zero and spreads the
error (w - q) / Hinv_ii over the columns to its right (lazily across blocks). The mask is
chosen adaptively per block from W^2 / diag(Hinv)^2 on the already-updated weights.

Exact sparsity: within a block the reference keeps everything under one threshold (ties and
an off-by-one make it inexact); here each block prunes exactly its share of the layer total
round(out * in * sparsity) (cumulative rounding), picked as the lowest scores over the block,
or per row with `per_row=True`. N:M (n of every m kept, as magnitude.py) is chosen per m
columns when the first of them is reached. Dead inputs (H_ii = 0) get zero weights, pruned first.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from frugalflow.arch import arch_of
from frugalflow.calibration import (
    column_loop_threads,
    hessian_inverse_upper,
    input_groups,
    lazy_step,
    relative_error,
    run_sequential,
)
from frugalflow.prune.wanda import check_n_m, nm_prune_mask, prune_counts, row_prune_mask


def _cum(total: int, done: int, cols: int) -> int:
    """Pruned weights due after `done` of `cols` columns, for `total` in all (rounded)."""
    return (2 * total * done + cols) // (2 * cols)


def _block_mask(score: torch.Tensor, i1: int, i2: int, cols: int, sparsity: float,
                splits: list[int], per_row: bool) -> torch.Tensor:
    """True where pruned inside columns [i1, i2), exact per row segment (one segment per linear)."""
    pruned = torch.zeros_like(score, dtype=torch.bool)
    r0 = 0
    for rows in splits:
        seg = score[r0:r0 + rows]
        if per_row:
            totals = prune_counts(rows, cols, sparsity, device=score.device)
            k = (2 * totals * i2 + cols) // (2 * cols) - (2 * totals * i1 + cols) // (2 * cols)
            pruned[r0:r0 + rows] = row_prune_mask(seg, k)
        else:
            total = int(round(rows * cols * sparsity))
            k = _cum(total, i2, cols) - _cum(total, i1, cols)
            if k > 0:
                idx = torch.topk(seg.flatten(), k, largest=False).indices
                pruned[r0:r0 + rows].view(-1)[idx] = True
        r0 += rows
    return pruned


def _prune(W: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, sparsity: float,
           n_m: tuple[int, int] | None, blocksize: int, splits: list[int], per_row: bool = False):
    """Returns (W_pruned, keep mask, row losses); exact sparsity per row segment of `splits`."""
    with column_loop_threads(W.device):
        return _prune_columns(W, Hinv, dead, sparsity, n_m, blocksize, splits, per_row)


def _prune_columns(W, Hinv, dead, sparsity, n_m, blocksize, splits, per_row):
    W = W.float().clone()
    rows, cols = W.shape
    check_n_m(n_m, cols)
    m = n_m[1] if n_m is not None else 1
    if blocksize % m:
        blocksize = m * max(1, round(blocksize / m))
    step = lazy_step(blocksize, m, W.device)
    W[:, dead] = 0
    pruned = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(rows, device=W.device)
    dH = torch.diag(Hinv)
    for b1 in range(0, cols, blocksize):  # mask block: W[:, b1:b2] is up to date here
        b2 = min(b1 + blocksize, cols)
        if n_m is None:
            pruned[:, b1:b2] = _block_mask(W[:, b1:b2] ** 2 / dH[b1:b2] ** 2, b1, b2, cols, sparsity, splits, per_row)
        for i1 in range(b1, b2, step):  # lazy batch
            i2 = min(i1 + step, b2)
            W1 = W[:, i1:i2].clone()
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = dH[i1:i2]
            mask1 = pruned[:, i1:i2]  # a view: N:M choices below land in `pruned`
            for i in range(i2 - i1):
                if n_m is not None and i % m == 0:
                    mask1[:, i:i + m] = nm_prune_mask(W1[:, i:i + m] ** 2 / d[i:i + m] ** 2, n_m[0], m)
                w = W1[:, i]
                q = w.masked_fill(mask1[:, i], 0.0)
                Q1[:, i] = q
                err = (w - q) / d[i]
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            losses += (Err1 ** 2).sum(1) / 2
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    return W, ~pruned, losses


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None,
                    blocksize: int = 128, dampening: float = 0.01,
                    per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune W [out, in] given H = 2/n X^T X [in, in]: (W_pruned float32, keep mask, OBS loss)."""
    Hinv, dead = hessian_inverse_upper(H, dampening)
    W_new, keep, losses = _prune(W, Hinv, dead, sparsity, n_m, blocksize, [W.shape[0]], per_row)
    return W_new, keep, losses.sum().item()


def prune_sparsegpt(model: nn.Module, calib_windows: torch.Tensor, sparsity: float,
                    n_m: tuple[int, int] | None = None, blocksize: int = 128, dampening: float = 0.01,
                    device: str = "cpu", on_progress: Callable[[int, int], None] | None = None,
                    batch_size: int = 8, per_row: bool = False) -> dict[str, dict]:
    """Prune every decoder linear in place; per linear {"sparsity", "recon_error", "loss"}.

    Linears sharing an input (q/k/v, gate/up) share one Hessian inverse and are solved as one
    stacked matrix (rows are independent; sparsity stays exact per linear).
    """
    arch = arch_of(model)

    def solve(_i, layer, stats):
        out = {}
        for group in input_groups(arch):
            H = stats[group[0]]["H"]
            lins = [layer.get_submodule(n) for n in group]
            Ws = [lin.weight.data.float() for lin in lins]
            Hinv, dead = hessian_inverse_upper(H, dampening)
            W_new, keep, losses = _prune(torch.cat(Ws), Hinv, dead, sparsity, n_m, blocksize,
                                         [w.shape[0] for w in Ws], per_row)
            r0 = 0
            for name, lin, W in zip(group, lins, Ws):
                r1 = r0 + W.shape[0]
                out[name] = {"sparsity": 1.0 - keep[r0:r1].float().mean().item(),
                             "recon_error": relative_error(W, W_new[r0:r1], H),
                             "loss": losses[r0:r1].sum().item()}
                lin.weight.data.copy_(W_new[r0:r1].to(lin.weight.dtype))
                r0 = r1
        return out

    return run_sequential(model, calib_windows, solve, needs=("H",), device=device,
                          batch_size=batch_size, on_progress=on_progress)


def run(stage, model_dir, out_dir, ctx):
    """Recipe entry (config.SparseGPTPrune)."""
    from frugalflow.method import MethodResult, float_model, layer_progress, save

    model, _ = float_model(model_dir, ctx["device"])
    layers = prune_sparsegpt(model, ctx["calib"](), stage.sparsity, stage.n_m, blocksize=stage.blocksize,
                             dampening=stage.dampening, device=ctx["device"],
                             on_progress=layer_progress(ctx, "sparsegpt"))
    save(model, out_dir, model_dir)
    return MethodResult({"layers": layers}, {"sparsity": {n: s["sparsity"] for n, s in layers.items()}})
