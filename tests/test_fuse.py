"""Inference-time fusion of packed linears that share an input (q/k/v, gate/up): one kernel call per
group, the same outputs as unfused, whatever order the members are called in."""
from __future__ import annotations

import pytest
import torch
from helpers import stage_config

from frugalflow.models import load_model
from frugalflow.quant.fuse import FusedMember, fuse_shared_inputs
from frugalflow.quant.pack import QuantLinear
from frugalflow.stages import run_stage

IDS = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = tmp_path_factory.mktemp("fuse") / "rtn"
    run_stage(stage_config("rtn", bits=4, group_size=32), tiny_model_dir, out, data_dir=tiny_data_dir,
              teacher_dir=tiny_model_dir)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_gives_the_unfused_outputs(packed, dtype):
    model = load_model(packed, dtype=dtype)
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        greedy = model.generate(IDS[:1, :5], max_new_tokens=8, do_sample=False)
    assert fuse_shared_inputs(model) == 4  # 2 layers x (q/k/v, gate/up)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedMember) and isinstance(model.model.layers[0].mlp.up_proj, FusedMember)
    assert model.model.layers[0].fused_q_k_v.fused.out_features == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, ref, atol=1e-5, rtol=1e-4)
        assert torch.equal(model.generate(IDS[:1, :5], max_new_tokens=8, do_sample=False), greedy)


def test_members_called_out_of_order_or_on_other_inputs_compute_again(packed):
    plain, model = load_model(packed), load_model(packed)
    fuse_shared_inputs(model)
    ours, theirs = model.model.layers[1].self_attn, plain.model.layers[1].self_attn
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        ours.q_proj(x)
        assert torch.allclose(ours.k_proj(y), theirs.k_proj(y), atol=1e-5)  # another input: not x's slice
        assert torch.allclose(ours.v_proj(x), theirs.v_proj(x), atol=1e-5)
        x.mul_(2)  # changed in place: the kept output is stale
        assert torch.allclose(ours.v_proj(x), theirs.v_proj(x), atol=1e-5)
    with torch.inference_mode():  # no version counters: the same object is reused, another one is not
        x = torch.randn(3, 64)
        ours.q_proj(x)
        assert torch.allclose(ours.k_proj(x), theirs.k_proj(x), atol=1e-5)
        assert torch.allclose(ours.v_proj(x.clone()), theirs.v_proj(x), atol=1e-5)


def test_groups_on_different_grids_stay_apart(packed):
    model = load_model(packed)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj = QuantLinear.from_codes(  # one member on another grid
            torch.zeros(32, 64, dtype=torch.uint8), torch.ones(32, 1), torch.zeros(32, 1), 8, -1)
    assert fuse_shared_inputs(model) == 3
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
