"""Model I/O: dense and packed round trips are exact, errors are clear, saves are atomic."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import frugalflow.models as models
from frugalflow.arch import compressible_linears
from frugalflow.models import ModelLoadError, load_model, load_tokenizer, model_stats, save_model, weights_size_mb
from frugalflow.prune.magnitude import prune_magnitude
from frugalflow.quant.pack import dequantize_model, quantize_model, quantized_modules
from frugalflow.quant.rtn import compute_qparams, quantize

IDS = torch.tensor([[0, 5, 17, 42, 99, 200, 383, 7, 64, 128]])


def quantize_tiny(model, bits=4, group_size=32, symmetric=False):
    qparams = {}
    for name, m in compressible_linears(model).items():
        scale, zero = compute_qparams(m.weight.data, bits, group_size, symmetric)
        qparams[name] = (quantize(m.weight.data, scale, zero, bits, group_size), scale, zero)
    return quantize_model(model, qparams, bits, group_size, symmetric=symmetric)


@torch.no_grad()
def logits(model):
    return model(IDS).logits


def packed_state(model):
    return {f"{n}.{b}": getattr(m, b) for n, m in quantized_modules(model).items()
            for b in ("qweight", "scales", "zeros")}


def test_dense_round_trip(tiny_model, tiny_model_dir, tmp_path):
    out = save_model(tiny_model, tmp_path / "dense", tokenizer_dir=tiny_model_dir)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    loaded = load_model(out)
    assert not loaded.training
    assert torch.equal(logits(loaded), logits(tiny_model))
    assert load_tokenizer(out).encode("def f(x): return x") == load_tokenizer(tiny_model_dir).encode(
        "def f(x): return x")
    stats = model_stats(loaded)
    assert stats["bits_per_weight"] == 32.0 and stats["sparsity"] == 0.0
    assert stats["n_params"] == sum(p.numel() for p in tiny_model.parameters())


def test_quantized_round_trip_is_bit_exact(tiny_model, tiny_model_dir, tmp_path):
    model = quantize_tiny(tiny_model)
    expected = logits(model)
    out = save_model(model, tmp_path / "q32", tokenizer_dir=tiny_model_dir, float_dtype=torch.float32)
    meta = json.loads((out / "quantization.json").read_text())
    assert (meta["bits"], meta["group_size"], len(meta["modules"])) == (4, 32, 14)
    loaded = load_model(out)
    for name, t in packed_state(model).items():
        got = packed_state(loaded)[name]
        assert got.dtype == t.dtype and torch.equal(got, t), name
    assert torch.equal(logits(loaded), expected)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied, stored once
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


def test_fp16_export_reloads_exactly(tiny_model, tmp_path):
    model = quantize_tiny(tiny_model, bits=4, group_size=64)
    first = load_model(save_model(model, tmp_path / "a"))
    stored = load_file(tmp_path / "a" / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.float16
    assert stored["model.layers.0.mlp.up_proj.qweight"].dtype == torch.uint8
    second = load_model(save_model(first, tmp_path / "b"))
    assert torch.equal(logits(first), logits(second))
    for name, t in packed_state(first).items():
        assert torch.equal(packed_state(second)[name], t)
    # fp16 non-quantized tensors only move the logits by fp16 rounding
    assert (logits(first) - logits(model)).abs().max() <= 1e-2 * logits(model).abs().max()


def test_dequantize_loaded_model_matches(tiny_model, tmp_path):
    model = load_model(save_model(quantize_tiny(tiny_model), tmp_path / "q", float_dtype=torch.float32))
    packed_logits = logits(model)
    dense = dequantize_model(model)
    assert not quantized_modules(dense)
    assert (logits(dense) - packed_logits).abs().max() <= 3e-2 * packed_logits.abs().max()


def test_load_dtype_keeps_scales(tiny_model, tmp_path):
    out = save_model(quantize_tiny(tiny_model), tmp_path / "q")
    model = load_model(out, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    layer = next(iter(quantized_modules(model).values()))
    assert layer.scales.dtype == torch.float16
    assert logits(model).dtype == torch.bfloat16


def test_pruned_zeros_survive_quantization_and_reload(tiny_model, tmp_path):
    prune_magnitude(tiny_model, 0.5)
    pruned = {n: m.weight.detach() == 0 for n, m in compressible_linears(tiny_model).items()}
    pruned_sparsity = model_stats(tiny_model)["sparsity"]
    assert pruned_sparsity == pytest.approx(0.5, abs=1e-4)
    model = quantize_tiny(tiny_model)
    in_memory = model_stats(model)
    loaded = load_model(save_model(model, tmp_path / "pq"))
    reloaded = model_stats(loaded)
    assert reloaded == in_memory
    assert reloaded["sparsity"] >= pruned_sparsity  # tiny weights may also round onto the zero point
    for name, layer in quantized_modules(loaded).items():
        zero_point = layer.zeros.repeat_interleave(32, dim=1)
        assert (layer.codes() == zero_point)[pruned[name]].all(), name
        assert (layer.dequantize()[pruned[name]] == 0).all()


def test_stats_of_quantized_model(tiny_model):
    n_params = sum(p.numel() for p in tiny_model.parameters())
    stats = model_stats(quantize_tiny(tiny_model, bits=4, group_size=32))
    assert stats["bits_per_weight"] == 4 + (16 + 8) / 32  # fp16 scale + uint8 zero per 32 weights
    assert stats["n_params"] == n_params
    assert stats["n_compressible_weights"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)


def test_quantized_size_on_disk(tiny_model, tmp_path):
    dense_dir = save_model(tiny_model, tmp_path / "fp32")
    fp32_bytes = weights_size_mb(dense_dir) * 1e6
    n_linear = sum(m.weight.numel() for m in compressible_linears(tiny_model).values())
    n_other = sum(p.numel() for p in tiny_model.parameters()) - n_linear
    assert fp32_bytes >= 4 * (n_linear + n_other)
    q_dir = save_model(quantize_tiny(tiny_model, bits=4, group_size=64), tmp_path / "q4")
    q_bytes = weights_size_mb(q_dir) * 1e6
    payload = n_linear * (4 + 24 / 64) / 8 + 2 * n_other  # packed codes + scale/zero + fp16 rest
    assert payload <= q_bytes <= payload + 8192  # header slack
    assert q_bytes < 0.25 * fp32_bytes
    assert weights_size_mb(q_dir) == pytest.approx(sum(p.stat().st_size for p in q_dir.glob("*.safetensors")) / 1e6)


@pytest.mark.parametrize("quantized", [False, True])
def test_truncated_safetensors_is_reported(tiny_model, tmp_path, quantized):
    model = quantize_tiny(tiny_model) if quantized else tiny_model
    out = save_model(model, tmp_path / "m")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match="model.safetensors.*truncated"):
        load_model(out)
    weights.write_bytes(b"\x01\x02")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(out)


def test_missing_and_unexpected_tensors(tiny_model, tmp_path):
    out = save_model(quantize_tiny(tiny_model), tmp_path / "q")
    weights = out / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.down_proj.scales"}, weights)
    with pytest.raises(ModelLoadError, match="missing tensors: model.layers.1.mlp.down_proj.scales"):
        load_model(out)
    save_file({**state, "model.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(ModelLoadError, match="unexpected tensors: model.extra.weight"):
        load_model(out)


def test_dense_missing_tensor(tiny_model, tmp_path):
    out = save_model(tiny_model, tmp_path / "d")
    state = load_file(out / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, out / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing keys.*model.norm.weight"):
        load_model(out)


def test_directory_errors(tiny_model, tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights)
    with pytest.raises(ModelLoadError, match=f"{no_weights}.*no weights"):
        load_model(no_weights)


def test_save_refuses_to_overwrite_and_is_atomic(tiny_model, tmp_path, monkeypatch):
    out = save_model(quantize_tiny(copy.deepcopy(tiny_model)), tmp_path / "m")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        save_model(tiny_model, out)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(quantize_tiny(type(tiny_model)(tiny_model.config)), out, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(quantize_tiny(type(tiny_model)(tiny_model.config)), tmp_path / "fresh")
    assert (out / "model.safetensors").read_bytes() == before  # old model untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no half-written or temp dirs
    monkeypatch.undo()
    save_model(tiny_model, out, overwrite=True)
    assert not (out / "quantization.json").exists()
    assert torch.equal(logits(load_model(out)), logits(tiny_model))


def test_bad_quantization_json(tiny_model, tmp_path):
    out = save_model(quantize_tiny(tiny_model), tmp_path / "q")
    meta_path = out / "quantization.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="quantization.json: not a valid"):
        load_model(out)
    del meta["modules"]["model.layers.0.mlp.up_proj"]["bits"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="bad settings for 'model.layers.0.mlp.up_proj'"):
        load_model(out)
