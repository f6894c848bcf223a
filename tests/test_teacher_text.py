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


def test_bos_prompts_are_not_taken_for_right_padding(tiny_model_dir, caplog):
    """The tokenizer's BOS and EOS are one id (as SmolLM2's are); every prompt is that one token and
    nothing is padded, so generate must not warn that it sees right-padding."""
    import transformers

    from frugalflow.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    assert tok.bos_token_id is not None and tok.bos_token_id == tok.eos_token_id
    transformers.logging.enable_propagation()
    try:
        generated_windows(tiny_model_dir, 4, 6, seed=0, batch=4)
    finally:
        transformers.logging.disable_propagation()
    assert not [r for r in caplog.records if "padding" in r.getMessage()]


def test_prompts_begin_the_rows_in_turn_and_no_prompt_is_the_old_sampling(tiny_model_dir):
    from frugalflow.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    prompts = ["", "hello world", "abc"]
    heads = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    assert heads[1] and heads[2]
    rows = generated_windows(tiny_model_dir, 7, 12, seed=3, batch=2, prompts=prompts)
    assert rows.shape == (7, 12)
    for i, row in enumerate(rows):
        head = heads[i % 3]
        assert row[:len(head)].tolist() == head, i
    assert torch.equal(rows, generated_windows(tiny_model_dir, 7, 12, seed=3, batch=2, prompts=prompts))
    # [''] and no prompts are the same samples from the begin-of-sequence token
    assert torch.equal(generated_windows(tiny_model_dir, 3, 12, seed=1, batch=2, prompts=[""]),
                       generated_windows(tiny_model_dir, 3, 12, seed=1, batch=2))


def test_a_prompt_as_long_as_the_sequence_is_refused(tiny_model_dir):
    import pytest

    with pytest.raises(ValueError, match="generated_prompts: 'hello world hello world' is"):
        generated_windows(tiny_model_dir, 2, 3, seed=0, prompts=["hello world hello world"])


def test_distillation_passes_the_stage_s_prompts(tiny_model_dir, tiny_data_dir):
    stage = stage_config("tsld", train_splits=["generated"], generated_sequences=4, generated_tokens=12,
                         generated_prompts=["", "hello"])
    windows = training_windows(stage, tiny_data_dir, tiny_model_dir, 5, lambda msg, m: None)
    assert torch.equal(windows, generated_windows(tiny_model_dir, 4, 12, seed=5, prompts=["", "hello"]))
