"""Per-layer quantization sensitivity, and the choice of layers kept at higher precision.

Sensitivity of decoder layer i: the mean KL divergence (nats per token) of the model's
next-token distribution when layer i alone is rounded onto the low-bit grid (RTN, the
grid's own scales) against the model as it is, on a few calibration windows. The layers
with the largest sensitivity per extra stored bit are kept at the higher precision until the
budget (a share of the decoder's linear weights) is spent.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalflow.arch import arch_of, decoder_layers
from frugalflow.evaluate.perplexity import model_device
from frugalflow.quant.rtn import fake_quantize


def _log_probs(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=windows, use_cache=False).logits.float(), dim=-1)


@torch.inference_mode()
def layer_sensitivity(model: nn.Module, windows: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                      on_progress: Callable[[int, int], None] | None = None) -> list[float]:
    """KL(model || model with layer i's linears on the bits/group_size grid) per decoder layer, mean
    per token over `windows` [N, L]. The model's weights are left as they were."""
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a [N, L] tensor with N >= 1, got {tuple(windows.shape)}")
    arch, layers = arch_of(model), decoder_layers(model)
    was_training = model.training
    model.eval()
    windows = windows.to(model_device(model))
    reference = [_log_probs(model, w[None]) for w in windows]
    out = []
    try:
        for i, layer in enumerate(layers):
            lins = [layer.get_submodule(n) for n in arch.linears]
            kept = [lin.weight.data.clone() for lin in lins]
            for lin in lins:
                lin.weight.data.copy_(fake_quantize(lin.weight.data, bits, group_size, symmetric))
            kl = sum(F.kl_div(_log_probs(model, w[None]), ref, log_target=True, reduction="sum").item()
                     for w, ref in zip(windows, reference))
            out.append(kl / windows.numel())
            for lin, W in zip(lins, kept):
                lin.weight.data.copy_(W)
            if on_progress is not None:
                on_progress(i, len(layers))
    finally:
        model.train(was_training)
    return out


def choose_layers(sensitivity: list[float], layer_weights: list[int], share: float) -> list[int]:
    """Indices of the layers to keep at higher precision: most sensitive first, while their weights
    stay within `share` of all (layers of equal size: the top share of the layers by sensitivity)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    budget, spent, chosen = share * sum(layer_weights), 0, []
    for i in sorted(range(len(sensitivity)), key=lambda i: -sensitivity[i] / layer_weights[i]):
        if spent + layer_weights[i] <= budget:
            chosen.append(i)
            spent += layer_weights[i]
    return sorted(chosen)
