"""Perplexity over fixed token windows: exp of the mean next-token NLL.

Each window [L] is scored on its own (no context carried between windows): positions
0..L-2 predict tokens 1..L-1, so every window contributes exactly L-1 tokens. Only the
model's forward is used, so compressed models with custom linear modules work too.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter, else of the first buffer, else CPU."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def window_nll(model: nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (float64) and token count for a batch of windows [B, L]."""
    logits = model(input_ids=windows, use_cache=False).logits[:, :-1]
    targets = windows[:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll.double()), targets.numel()


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
               on_progress: Callable[[int, int], None] | None = None) -> float:
    """exp(total NLL / total tokens) over all windows [N, L] (L >= 2).

    Runs in eval mode under torch.inference_mode on the model's device (the caller's
    train/eval mode is restored). on_progress(windows_done, n_windows) after each batch."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a [N, L] tensor with N >= 1 and L >= 2, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for i in range(0, windows.shape[0], batch_size):
                nll, count = window_nll(model, windows[i:i + batch_size].to(device))
                total_nll += nll
                total_tokens += count
                if on_progress is not None:
                    on_progress(min(i + batch_size, windows.shape[0]), windows.shape[0])
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)
