"""What a distillation stage trains on: its `train_splits` as one tensor of token windows."""
from __future__ import annotations

from typing import Callable

import torch

from frugalflow.data import load_windows
from frugalflow.teacher_text import generated_windows


def training_windows(stage, data_dir, teacher_dir, seed: int, report: Callable, device: str = "cpu") -> torch.Tensor:
    """The stage's `train_splits` as one tensor of windows: prepared splits, and with `generated` the
    teacher's own samples (seeded, so every rank draws the same). Splits of different lengths are
    cut into chunks of the shortest, so no token is dropped beyond a window's remainder."""
    parts = []
    for split in stage.train_splits:
        if split == "generated":
            parts.append(generated_windows(teacher_dir, stage.generated_sequences, stage.generated_tokens, seed,
                                           device=str(device), prompts=stage.generated_prompts,
                                           on_batch=lambda done, n: report(
                                               f"teacher generated {done}/{n} sequences", {})))
        else:
            parts.append(load_windows(data_dir, split))
    length = min(p.shape[1] for p in parts)
    return torch.cat([p[:, : p.shape[1] // length * length].reshape(-1, length) for p in parts])
