"""Corpus splitting and token windows."""
from __future__ import annotations

import hashlib
import pydoc_data.topics

import pytest

from frugalflow.config import DataConfig
from frugalflow.data import load_windows, prepare_data, split_documents, split_of, tokenize_fn


def test_split_follows_the_hash_protocol_and_is_disjoint():
    keys = split_documents(pydoc_data.topics.topics)
    assert set(keys) == {"calib", "train", "eval"}
    everything = [k for ks in keys.values() for k in ks]
    assert len(everything) == len(set(everything)) == len(pydoc_data.topics.topics)
    for key in keys["eval"]:
        assert int(hashlib.sha1(key.encode()).hexdigest(), 16) % 5 == 4
    for key in keys["calib"]:
        assert int(hashlib.sha1(key.encode()).hexdigest(), 16) % 5 in (0, 1, 2)
    assert split_of(keys["train"][0]) == "train"


def test_prepare_data_writes_windows_from_disjoint_text(tmp_path, tiny_model_dir):
    cfg = DataConfig(window=64, calib_windows=5, train_windows=7, eval_windows=3, path=str(tmp_path))
    manifest = prepare_data(cfg, tiny_model_dir)
    calib, train, ev = (load_windows(tmp_path, s) for s in ("calib", "train", "eval"))
    assert calib.shape == (5, 64) and train.shape == (7, 64) and ev.shape == (3, 64)
    assert manifest["splits"]["eval"]["windows"] == 3
    # windows are consecutive slices of the tokenized split text: no window appears in two splits
    rows = {tuple(r.tolist()) for t in (calib, train, ev) for r in t}
    assert len(rows) == 15


def test_text_files_corpus_and_clear_errors(tmp_path, tiny_model_dir):
    missing = DataConfig(corpus="text_files", text_files=[str(tmp_path / "nope.txt")], path=str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare_data(missing, tiny_model_dir)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    cfg = DataConfig(corpus="text_files", text_files=[str(short)], window=64, path=str(tmp_path / "d"))
    with pytest.raises(ValueError, match="fewer than one window"):
        prepare_data(cfg, tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        load_windows(tmp_path / "empty", "eval")


def test_stage_tokenizes_like_the_transformers_tokenizer(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    """The stage runs tokenizer.json through `tokenizers` directly; its ids are the ones the model's
    transformers tokenizer gives, and a folder without tokenizer.json still goes through AutoTokenizer."""
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[40:60])
    expected = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert len(expected) > 1000
    assert tokenize_fn(tiny_model_dir)(text) == expected

    class Recorded:
        calls = []

        @classmethod
        def from_pretrained(cls, path):
            cls.calls.append(str(path))
            return tiny_tokenizer

    import transformers

    slow_only = tmp_path / "no-tokenizer-json"
    slow_only.mkdir()
    monkeypatch.setattr(transformers, "AutoTokenizer", Recorded)
    assert tokenize_fn(slow_only)(text) == expected
    assert Recorded.calls == [str(slow_only)]
