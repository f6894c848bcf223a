"""Corpus splitting and token windows."""
from __future__ import annotations

import hashlib
import pydoc_data.topics

import pytest
import torch

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


def test_calib_mix_appends_the_first_windows_of_each_source(tmp_path, tiny_model_dir):
    (tmp_path / "fr").mkdir()
    (tmp_path / "fr" / "b.txt").write_text("le chat dort sur le tapis rouge " * 40)
    (tmp_path / "fr" / "a.txt").write_text("une phrase en français, assez longue " * 40)
    (tmp_path / "de.txt").write_text("der Hund schläft im Garten hinter dem Haus " * 40)
    plain = DataConfig(window=64, calib_windows=5, train_windows=2, eval_windows=2, path=str(tmp_path / "plain"))
    mixed = plain.model_copy(update={"path": str(tmp_path / "mixed"), "calib_mix": DataConfig.model_validate(
        {"calib_mix": {"german": {"text_files": str(tmp_path / "de.txt"), "windows": 2},
                       "french": {"text_files": [str(tmp_path / "fr" / "*.txt")], "windows": 3}}}).calib_mix})
    prepare_data(plain, tiny_model_dir)
    manifest = prepare_data(mixed, tiny_model_dir)
    base, calib = load_windows(tmp_path / "plain", "calib"), load_windows(tmp_path / "mixed", "calib")
    assert calib.shape == (10, 64) and torch.equal(calib[:5], base)
    encode = tokenize_fn(tiny_model_dir)
    french = encode((tmp_path / "fr" / "a.txt").read_text() + "\n\n" + (tmp_path / "fr" / "b.txt").read_text())
    german = encode((tmp_path / "de.txt").read_text())
    # sources in name order, files in path order, the first windows of each
    assert calib[5:8].flatten().tolist() == french[:3 * 64]
    assert calib[8:].flatten().tolist() == german[:2 * 64]
    sources = manifest["splits"]["calib"]["sources"]
    assert list(sources) == ["pydoc_topics", "french", "german"]
    assert [s["windows"] for s in sources.values()] == [5, 3, 2]
    assert manifest["splits"]["calib"]["windows"] == 10
    # the other splits are untouched
    for split in ("train", "eval"):
        assert torch.equal(load_windows(tmp_path / "mixed", split), load_windows(tmp_path / "plain", split))


def test_calib_mix_errors_name_the_source(tmp_path, tiny_model_dir):
    (tmp_path / "short.txt").write_text("trop court")
    for mix, message in (({"fr": {"text_files": ["nowhere/*.txt"], "windows": 1}}, "data.calib_mix.fr.text_files"),
                         ({"fr": {"text_files": [str(tmp_path / "short.txt")], "windows": 1}},
                          r"data.calib_mix.fr: \d+ tokens give 0 windows of 64")):
        cfg = DataConfig.model_validate({"window": 64, "calib_windows": 2, "train_windows": 1, "eval_windows": 1,
                                         "path": str(tmp_path / "d"), "calib_mix": mix})
        with pytest.raises((FileNotFoundError, ValueError), match=message):
            prepare_data(cfg, tiny_model_dir)
    with pytest.raises(ValueError, match="windows"):
        DataConfig.model_validate({"calib_mix": {"fr": {"text_files": ["x.txt"], "windows": 0}}})
