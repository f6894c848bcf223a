"""Teacher-generated windows: the shape asked for, tokens of the vocabulary, the same for the same seed."""
from __future__ import annotations

import torch
from helpers import stage_config

from frugalflow.distill.train_data import training_windows
from frugalflow.teacher_text import generated_windows


def test_generated_windows_are_seeded_samples_of_the_requested_shape(tiny_model_dir, capsys):
    a = generated_windows(tiny_model_dir, 3, 12, seed=1, batch=2)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert 0 <= int(a.min()) and int(a.max()) < 384
    assert torch.equal(a, generated_windows(tiny_model_dir, 3, 12, seed=1, batch=2))
    assert not torch.equal(a, generated_windows(tiny_model_dir, 3, 12, seed=2, batch=2))
    assert "generated 3/3 sequences of 12 tokens" in capsys.readouterr().out


def test_distillation_trains_on_the_teacher_s_samples_seeded(tiny_model_dir, tiny_data_dir):
    stage = stage_config("tsld", train_splits=["generated"], generated_sequences=5, generated_tokens=12)
    seen = []
    windows = training_windows(stage, tiny_data_dir, tiny_model_dir, 7, lambda msg, m: seen.append(msg))
    assert torch.equal(windows, generated_windows(tiny_model_dir, 5, 12, seed=7))
    assert seen[-1] == "teacher generated 5/5 sequences"
