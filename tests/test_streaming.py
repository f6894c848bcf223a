"""Layer-streaming quantization (frugalflow/streaming.py) equals the in-memory stage on the tiny
model, tensor for tensor, from a single file or from bf16 shards, and reads one layer at a time."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import build_tiny_llama

from frugalflow import config as C
from frugalflow import streaming
from frugalflow.data import load_windows, prepare_data
from frugalflow.models import QUANT_META, load_model
from frugalflow.stages import run_stage


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("data")
    prepare_data(C.DataConfig(window=64, calib_windows=12, train_windows=2, eval_windows=2, path=str(path)),
                 tiny_model_dir)
    return path


@pytest.fixture(scope="module")
def sharded_bf16_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny model with 3 layers, stored bf16 in several shards (as large checkpoints are)."""
    path = tmp_path_factory.mktemp("sharded")
    model = build_tiny_llama(seed=4)
    model.config.num_hidden_layers = 3
    model = type(model)(model.config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path


def _stage(**kw):
    return C.Recipe.model_validate({"stages": [kw]}).stages[0]


def _assert_same_model(a, b):
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    assert json.loads((a / QUANT_META).read_text()) == json.loads((b / QUANT_META).read_text())
    ca, cb = json.loads((a / "config.json").read_text()), json.loads((b / "config.json").read_text())
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    assert ca == cb


@pytest.mark.parametrize("source, stage, via", [
    ("single", dict(method="gptq", bits=4, group_size=32), "library"),
    ("single", dict(method="gptq", bits=4, group_size=32, act_order=True, clip_search=True), "stage"),
    ("single", dict(method="gptq", bits=4, group_size=32, propagate=False), "stage"),
    ("sharded_bf16", dict(method="gptq", bits=3, group_size=-1, symmetric=True, act_order=True), "library"),
    ("sharded_bf16", dict(method="rtn", bits=4, group_size=32), "stage"),
])
def test_streaming_equals_in_memory(tmp_path, tiny_model_dir, sharded_bf16_dir, data_dir, source, stage, via):
    src = tiny_model_dir if source == "single" else sharded_bf16_dir
    cfg = _stage(**stage)
    run_stage(cfg, src, tmp_path / "memory", data_dir=data_dir, teacher_dir=src)
    n_layers = load_model(src).config.num_hidden_layers
    if via == "stage":  # the recipe key `stream: true`, as the flow runs it
        seen = []
        stats = run_stage(_stage(**stage, stream=True), src, tmp_path / "stream", data_dir=data_dir, teacher_dir=src,
                          report=lambda message, metrics: seen.append(message))
        assert seen == [f"{cfg.method} (streaming): layer {i}/{n_layers}" for i in range(1, n_layers + 1)]
        assert stats["bits_per_weight"] < 5 and len(stats["seconds_per_layer"]) == n_layers
    else:
        seen = []
        stats = streaming.stream_quantize(src, tmp_path / "stream", cfg.method, load_windows(data_dir, "calib"),
                                          bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric,
                                          act_order=getattr(cfg, "act_order", False), tokenizer_dir=src,
                                          on_progress=lambda i, n, info: seen.append((i, n)))
        assert seen == [(i, n_layers) for i in range(n_layers)]
    assert len(stats["seconds_per_layer"]) == n_layers and len(stats["layers"]) == 7 * n_layers
    _assert_same_model(tmp_path / "memory", tmp_path / "stream")
    assert (tmp_path / "stream" / "tokenizer.json").is_file()
    assert len(list((tmp_path / "stream").glob("*.safetensors"))) > n_layers  # one shard per layer and more


def test_reads_one_layer_at_a_time(tmp_path, sharded_bf16_dir, data_dir, monkeypatch):
    reads = []
    real = streaming.ShardReader.read

    def spy(self, names, dtype=None):
        reads.append(list(names))
        return real(self, names, dtype)

    monkeypatch.setattr(streaming.ShardReader, "read", spy)
    streaming.stream_quantize(sharded_bf16_dir, tmp_path / "out", "gptq", load_windows(data_dir, "calib"), bits=4,
                              group_size=32, symmetric=False)
    layers_read = []
    for names in reads:
        idx = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
        assert len(idx) <= 1, names  # never two layers in one read
        assert all(n.startswith(f"model.layers.{i}.") for i in idx for n in names), names  # nothing else
        layers_read += [int(i) for i in idx]
    assert [i for i, _ in itertools.groupby(layers_read)] == [0, 1, 2]  # each layer loaded once, in order
    read = [n for names in reads for n in names if n.startswith("model.layers.")]
    assert len(read) == len(set(read))  # every layer tensor read once (the embedding: to capture, then to copy)


def test_streaming_refuses_bad_input(tmp_path, tiny_model_dir, data_dir):
    cfg = dict(bits=4, group_size=32, symmetric=False)
    with pytest.raises(ValueError, match="gptq needs calibration windows"):
        streaming.stream_quantize(tiny_model_dir, tmp_path / "a", "gptq", None, **cfg)
    with pytest.raises(ValueError, match="one of rtn, gptq"):
        streaming.stream_quantize(tiny_model_dir, tmp_path / "a", "awq", None, **cfg)
    run_stage(_stage(method="rtn", bits=4, group_size=32), tiny_model_dir, tmp_path / "q", data_dir=data_dir,
              teacher_dir=tiny_model_dir)
    with pytest.raises(ValueError, match="already quantized"):
        streaming.stream_quantize(tmp_path / "q", tmp_path / "b", "rtn", None, **cfg)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        streaming.stream_quantize(tiny_model_dir, tmp_path / "exists", "rtn", None, **cfg)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.tmp-*"))
