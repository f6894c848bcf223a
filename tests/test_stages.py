"""Every recipe method through `run_stage` on a tiny model: output loads back, with the
promised sparsity and bit width, and masks survive later stages."""
from __future__ import annotations

import pytest
import torch
from helpers import stage_config

from frugalflow import config as C
from frugalflow.arch import compressible_linears
from frugalflow.data import load_windows
from frugalflow.method import entry_for
from frugalflow.models import load_model
from frugalflow.quant.pack import quantized_modules
from frugalflow.stages import run_stage


@pytest.mark.parametrize("method, kw, sparsity", [
    ("magnitude", {"sparsity": 0.5}, 0.5),
    ("wanda", {"sparsity": 0.5}, 0.5),
    ("sparsegpt", {"sparsity": 0.5}, 0.5),
    ("sparsegpt", {"pattern": "2:4"}, 0.5),
    ("wanda", {"pattern": "4:8"}, 0.5),
])
def test_pruning_methods(tmp_path, tiny_model_dir, tiny_data_dir, method, kw, sparsity):
    stats = run_stage(stage_config(method, **kw), tiny_model_dir, tmp_path / "out", data_dir=tiny_data_dir,
                      teacher_dir=tiny_model_dir)
    assert stats["sparsity"] == pytest.approx(sparsity, abs=1e-6)
    assert stats["bits_per_weight"] == 32
    assert all(layer["sparsity"] == pytest.approx(sparsity, abs=1e-6) for layer in stats["layers"].values())


@pytest.mark.parametrize("method, kw", [
    ("rtn", {"bits": 4, "group_size": 32}),
    ("rtn", {"bits": 3, "group_size": -1, "symmetric": True}),
    ("gptq", {"bits": 4, "group_size": 32, "act_order": True}),
    ("gptq", {"bits": 4, "group_size": 32, "act_order": True, "awq_scales": True, "clip_search": True}),
    ("awq", {"bits": 4, "group_size": 64, "n_grid": 4}),
])
def test_quantization_methods_keep_a_pruned_mask(tmp_path, tiny_model_dir, tiny_data_dir, method, kw):
    pruned = tmp_path / "pruned"
    run_stage(stage_config("magnitude", sparsity=0.4), tiny_model_dir, pruned, data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    dense_zero = {n: (m.weight == 0) for n, m in compressible_linears(load_model(pruned)).items()}
    out = tmp_path / "quant"
    stats = run_stage(stage_config(method, **kw), pruned, out, data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    model = load_model(out)
    modules = quantized_modules(model)
    assert len(modules) == len(dense_zero) and all(m.bits == kw["bits"] for m in modules.values())
    for name, m in modules.items():
        assert torch.all(m.dequantize()[dense_zero[name]] == 0), f"{method} filled pruned weights in {name}"
    assert stats["sparsity"] >= 0.4 - 1e-3 and kw["bits"] <= stats["bits_per_weight"] < kw["bits"] + 2
    logits = model(torch.arange(16).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


def test_every_schema_method_has_an_entry():
    for method in C.METHODS:
        assert callable(entry_for(stage_config(method))), method


def test_search_results_are_written_with_the_stage(tmp_path, tiny_model_dir, tiny_data_dir):
    import json

    out = tmp_path / "awq"
    stats = run_stage(stage_config("awq", bits=4, group_size=64, n_grid=4), tiny_model_dir, out, data_dir=tiny_data_dir,
                      teacher_dir=tiny_model_dir)
    assert stats["search"] == ["awq_clips", "awq_scales"]
    scales = json.loads((out / "search" / "awq_scales.json").read_text())
    assert scales and all(len(e["scales"]) > 0 and 0 <= e["alpha"] < 1 for e in scales)
    assert all("recon_error" in s for s in stats["layers"].values())


def test_gptq_on_awq_scales(tmp_path, tiny_model_dir, tiny_data_dir):
    """`awq_scales`: the searched scales are kept with the stage and GPTQ quantizes the scaled model (another
    grid than plain GPTQ), which computes what the base model computes up to 4-bit rounding."""
    import json

    ids = load_windows(tiny_data_dir, "eval")[:2, :32]
    with torch.no_grad():
        reference = load_model(tiny_model_dir)(ids).logits
    errors, scales = {}, {}
    for awq in (False, True):
        out = tmp_path / f"awq{awq}"
        stats = run_stage(stage_config("gptq", bits=4, group_size=32, awq_scales=awq), tiny_model_dir, out,
                          data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
        model = load_model(out)
        scales[awq] = {n: m.scales for n, m in quantized_modules(model).items()}
        with torch.no_grad():
            errors[awq] = ((model(ids).logits - reference) ** 2).mean().item() / (reference ** 2).mean().item()
        assert ("awq_scales" in stats.get("search", [])) == awq
    found = json.loads((tmp_path / "awqTrue" / "search" / "awq_scales.json").read_text())
    assert found and all(0 <= e["alpha"] < 1 for e in found)
    assert any(not torch.equal(scales[True][n], scales[False][n]) for n in scales[True])
    assert errors[True] < 0.05


def test_gptq_log8_scales_without_propagation(tmp_path, tiny_model_dir, tiny_data_dir):
    """scale_format log8 with awq_scales on a 4-point grid and propagate false: one byte per group's scale
    (4.5 bits per weight at w4 g32, plus the per-layer offsets), AWQ's alphas on that grid, and the model
    computes what the base model computes up to 4-bit rounding."""
    import json

    ids = load_windows(tiny_data_dir, "eval")[:2, :32]
    with torch.no_grad():
        reference = load_model(tiny_model_dir)(ids).logits
    out = tmp_path / "log8"
    run_stage(stage_config("gptq", bits=4, group_size=32, awq_scales=True, awq_grid=4, propagate=False,
                           clip_search=True, scale_format="log8"), tiny_model_dir, out, data_dir=tiny_data_dir,
              teacher_dir=tiny_model_dir)
    model = load_model(out)
    layers = quantized_modules(model)
    assert {m.scale_format for m in layers.values()} == {"log8"}
    assert all(m.storage_bits() == m.in_features * m.out_features * 4.5 + 32 for m in layers.values())
    assert json.loads((out / "quantization.json").read_text())["modules"].popitem()[1]["scale_dtype"] == "log8"
    alphas = {e["alpha"] for e in json.loads((out / "search" / "awq_scales.json").read_text())}
    assert alphas <= {0.0, 0.25, 0.5, 0.75}
    with torch.no_grad():
        error = ((model(ids).logits - reference) ** 2).mean().item() / (reference ** 2).mean().item()
    assert error < 0.05


@pytest.mark.parametrize("method, scale_format", [("kl", "float16"), ("tsld", "float16"), ("tsld", "log8")])
def test_distillation_keeps_mask_and_grid(tmp_path, tiny_model_dir, tiny_data_dir, method, scale_format):
    pruned, quant, out = tmp_path / "pruned", tmp_path / "quant", tmp_path / "distilled"
    run_stage(stage_config("magnitude", sparsity=0.5), tiny_model_dir, pruned, data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    run_stage(stage_config("rtn", bits=4, group_size=32, scale_format=scale_format), pruned, quant,
              data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    stats = run_stage(stage_config(method, steps=3, batch_size=2, seq_len=32, lr=1e-2, ce_weight=0.5), quant, out,
                      data_dir=tiny_data_dir, teacher_dir=tiny_model_dir, pruned=True)
    before, after = quantized_modules(load_model(quant)), quantized_modules(load_model(out))
    pruned_model = load_model(pruned)
    changed = 0
    for name, m in after.items():
        ref = before[name]
        assert torch.equal(m.scales, ref.scales) and torch.equal(m.zeros, ref.zeros), "grid changed"
        assert m.scale_format == ref.scale_format == scale_format
        pruned_mask = pruned_model.get_submodule(name).weight == 0
        assert torch.all(m.dequantize()[pruned_mask] == 0), "pruned weight revived"
        changed += int((m.codes() != ref.codes()).sum())
    assert changed > 0, "training moved no code"
    assert stats["steps"] == 3 and stats["sparsity"] >= 0.5 - 1e-3


def test_distillation_trains_on_the_chosen_splits_only(tmp_path, tiny_model_dir, tiny_data_dir):
    kw = dict(steps=1, batch_size=1, seq_len=16)
    both = run_stage(stage_config("kl", **kw), tiny_model_dir, tmp_path / "both", data_dir=tiny_data_dir,
                     teacher_dir=tiny_model_dir)
    train = run_stage(stage_config("kl", train_splits=["train"], **kw), tiny_model_dir, tmp_path / "train",
                      data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    assert (both["train_windows"], train["train_windows"]) == (8 + 8, 8)
    # the teacher's own samples, beside a prepared split: the longer windows cut into chunks of the shorter
    mixed = run_stage(stage_config("kl", train_splits=["train", "generated"], generated_sequences=3,
                                   generated_tokens=16, **kw), tiny_model_dir, tmp_path / "mixed",
                      data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    window = load_windows(tiny_data_dir, "train").shape[1]
    assert mixed["train_windows"] == 8 * (window // 16) + 3
    with pytest.raises(ValueError, match="train_splits"):  # never the evaluation windows
        stage_config("kl", train_splits=["eval"])


def test_tsld_token_score_reaches_the_training(tmp_path, tiny_model_dir, tiny_data_dir):
    kw = dict(steps=2, batch_size=2, seq_len=32, lr=1e-2, tau=0.5)
    for score in ("target", "entropy"):
        run_stage(stage_config("tsld", scale_by=score, **kw), tiny_model_dir, tmp_path / score,
                  data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    target, entropy = (load_model(tmp_path / score).state_dict() for score in ("target", "entropy"))
    assert any(not torch.equal(target[k], entropy[k]) for k in target)
    with pytest.raises(ValueError, match="'target' or 'entropy'"):
        stage_config("tsld", scale_by="confidence")


def test_structured_pruning_gives_a_smaller_plain_model(tmp_path, tiny_model_dir, tiny_data_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "structured"
    stats = run_stage(stage_config("structured", mlp_ratio=0.25, drop_layers=1), tiny_model_dir, out, data_dir=tiny_data_dir,
                      teacher_dir=tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(out)  # no custom code
    assert model.config.intermediate_size == 96 and model.config.num_hidden_layers == 1
    assert stats["n_params"] == sum(p.numel() for p in model.parameters()) < 98_624
