"""OWL (Yin et al. 2023): outlier-weighted layer-wise sparsity, applied to Wanda.

Pass 1, on the dense model: the outlier ratio D_l of decoder layer l is the share of its
Wanda scores |W_ij| * ||X_j||_2 (all its linears together) above `outlier_m` times their
mean. D is rescaled to [0, 2 * lambda] and centred, and layer l gets sparsity
target - (D'_l - mean D'): layers with more outliers keep more weights, the mean stays the
target. Pass 2: wanda.prune_wanda with those per-layer sparsities.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from frugalflow.arch import arch_of
from frugalflow.calibration import input_groups, run_sequential
from frugalflow.prune.wanda import prune_wanda


def owl_sparsities(outlier_ratios: list[float], sparsity: float, owl_lambda: float) -> list[float]:
    """Per-layer sparsities from per-layer outlier ratios: mean `sparsity`, spread 2 * owl_lambda."""
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    span = float(d.max() - d.min()) if len(d) else 0.0
    if span == 0.0:
        return [sparsity] * len(d)
    d = (d - d.min()) / span * (2 * owl_lambda)
    return [min(max(float(s), 0.0), 0.99) for s in sparsity - (d - d.mean())]


@torch.no_grad()
def outlier_ratios(model: nn.Module, calib_windows: torch.Tensor, outlier_m: float, device: str = "cpu",
                   batch_size: int = 8, on_progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Per decoder layer: the share of its Wanda scores above outlier_m x their mean (model unchanged)."""
    arch = arch_of(model)
    ratios: list[float] = []

    def solve(_i, layer, stats):
        scores = []
        for group in input_groups(arch):
            x_norm = stats[group[0]]["x_norm"].float().reshape(1, -1)
            scores += [(layer.get_submodule(n).weight.data.float().abs() * x_norm).flatten() for n in group]
        s = torch.cat(scores)
        ratios.append(float((s > outlier_m * s.mean()).float().mean()))
        return {}

    run_sequential(model, calib_windows, solve, needs=("x_norm",), device=device, batch_size=batch_size,
                   on_progress=on_progress)
    return ratios


@torch.no_grad()
def prune_owl(model: nn.Module, calib_windows: torch.Tensor, sparsity: float, owl_lambda: float = 0.08,
              outlier_m: float = 5.0, device: str = "cpu", on_progress: Callable[[int, int], None] | None = None,
              batch_size: int = 8, recon_stride: int = 8) -> tuple[dict[str, dict], dict]:
    """Prune every decoder linear in place: (per linear {"sparsity", "recon_error"},
    search {"outlier_ratio": [...], "layer_sparsity": [...]}) with recon_error as in wanda.py."""
    ratios = outlier_ratios(model, calib_windows, outlier_m, device, batch_size)
    per_layer = owl_sparsities(ratios, sparsity, owl_lambda)
    layers = prune_wanda(model, calib_windows, per_layer, device=device, on_progress=on_progress,
                         batch_size=batch_size, recon_stride=recon_stride)
    return layers, {"outlier_ratio": ratios, "layer_sparsity": per_layer}


def run(stage, model_dir, out_dir, ctx):
    """Recipe entry (config.OWLPrune)."""
    from frugalflow.method import MethodResult, float_model, layer_progress, save

    model, _ = float_model(model_dir, ctx["device"])
    layers, search = prune_owl(model, ctx["calib"](), stage.sparsity, stage.owl_lambda, stage.outlier_m,
                               device=ctx["device"], on_progress=layer_progress(ctx, "owl"))
    save(model, out_dir, model_dir)
    return MethodResult({"layers": layers}, {"owl": search,
                                             "sparsity": {n: s["sparsity"] for n, s in layers.items()}})
