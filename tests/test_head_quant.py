"""The output head quantized int8 per row (`head_bits: 8`), its tied input embedding reading the same
codes: stored once, smaller on disk, close to the float model, kept through saving, loading,
distillation (on the grid, still tied) and export (dense again)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from gguf import GGUFReader, dequantize
from helpers import stage_config

from frugalflow.config import RecipeError
from frugalflow.export.common import load_for_export
from frugalflow.export.gguf import export_gguf
from frugalflow.models import load_model, weights_size_mb
from frugalflow.quant.pack import QuantLinear
from frugalflow.quant.runtime import TiedEmbedding, dequantize_all
from frugalflow.recipe_io import recipe_from_dict
from frugalflow.stages import run_stage

IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def heads(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    root = tmp_path_factory.mktemp("heads")
    out = {}
    for label, extra in (("float", {}), ("int8", {"head_bits": 8})):
        out[label] = root / label
        run_stage(stage_config("rtn", bits=4, group_size=32, **extra), tiny_model_dir, out[label],
                  data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    return out


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_head_and_embedding_share_one_int8_copy(heads):
    model = load_model(heads["int8"])
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, QuantLinear) and (head.bits, head.group_size) == (8, -1)
    assert bool((head.zeros == 128).all())  # symmetric: the int8 kernel needs no zero-point term
    assert isinstance(embedding, TiedEmbedding) and embedding.head is head
    ids = torch.tensor([0, 5, 383, 5])
    assert torch.equal(embedding(ids), head.dequantize(torch.float32)[ids])
    meta = json.loads((heads["int8"] / "quantization.json").read_text())
    assert meta["tied_embedding"] == "model.embed_tokens" and "lm_head" in meta["modules"]
    assert not any(k.startswith("model.embed_tokens") for k in model.state_dict())
    # 384 x 64 fp16 (49 kB) became 384 x 64 int8 + 384 fp16 scales and zeros
    saved = (weights_size_mb(heads["float"]) - weights_size_mb(heads["int8"])) * 1e6
    assert 384 * 64 * 2 - 384 * 64 - 384 * 3 - 200 <= saved <= 384 * 64 * 2 - 384 * 64


def test_int8_head_stays_close_to_the_float_head_in_both_dtypes(heads):
    ref = logits(load_model(heads["float"]))
    got = logits(load_model(heads["int8"]))
    assert (got - ref).abs().max() / ref.abs().max() < 0.02
    assert (got - ref).abs().max() > 0  # the head really is rounded
    bf16 = load_model(heads["int8"], dtype=torch.bfloat16)
    assert bf16.get_input_embeddings()(IDS).dtype == torch.bfloat16
    assert (logits(bf16) - ref).abs().max() / ref.abs().max() < 0.05


def test_dequantized_model_is_tied_again(heads):
    model = dequantize_all(load_model(heads["int8"]))
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.model.embed_tokens.weight is model.lm_head.weight
    packed = logits(load_model(heads["int8"]))  # the int8 kernel computes in bf16
    assert (logits(model) - packed).abs().max() / packed.abs().max() < 1e-2
    exported = load_for_export(heads["int8"])
    assert exported.model.embed_tokens.weight is exported.lm_head.weight
    assert isinstance(exported.model.layers[0].mlp.down_proj, QuantLinear)  # only the head is made dense


def test_gguf_export_writes_the_table_dense(tmp_path, heads):
    summary = export_gguf(heads["int8"], tmp_path / "m.gguf")
    tensors = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd for the head
    table = torch.from_numpy(dequantize(tensors["token_embd.weight"].data, tensors["token_embd.weight"].tensor_type))
    head = load_model(heads["int8"]).lm_head.dequantize(torch.float32)
    assert torch.allclose(table.reshape(head.shape).float(), head, atol=1e-3)
    assert summary["linears"] == {"Q4_1": 14}


def test_distillation_keeps_the_head_on_its_grid_and_tied(tmp_path, heads, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "tsld"
    run_stage(stage_config("tsld", steps=2, batch_size=2, seq_len=32, lr=1e-3), heads["int8"], out,
              data_dir=tiny_data_dir, teacher_dir=tiny_model_dir, pruned=False)
    before, after = load_model(heads["int8"]), load_model(out)
    head = after.get_output_embeddings()
    assert isinstance(head, QuantLinear) and after.get_input_embeddings().head is head
    assert torch.equal(head.scales, before.lm_head.scales) and torch.equal(head.zeros, before.lm_head.zeros)
    assert not torch.equal(head.qweight, before.lm_head.qweight)  # trained, then put back on the same grid


def test_head_bits_is_refused_where_it_cannot_apply():
    with pytest.raises(RecipeError, match="head_bits"):
        recipe_from_dict({"stages": [{"method": "gptq", "head_bits": 4}]})
    with pytest.raises(RecipeError, match="head_bits needs stream: false"):
        recipe_from_dict({"stages": [{"method": "rtn", "head_bits": 8, "stream": True}]})
