"""Mixed precision by measured sensitivity: per-layer KL, the budgeted choice, and a GPTQ stage
that keeps the chosen layers on the finer grid through packing, saving and loading."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import stage_config

from frugalflow.arch import decoder_layers
from frugalflow.config import RecipeError
from frugalflow.models import load_model
from frugalflow.quant.pack import quantized_modules
from frugalflow.quant.sensitivity import choose_layers, layer_sensitivity
from frugalflow.recipe_io import recipe_from_dict
from frugalflow.stages import run_stage


def test_sensitivity_tells_a_silent_layer_from_a_working_one_and_leaves_weights_alone(tiny_model):
    ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # layer 0 writes nothing into the residual stream: rounding it changes nothing
        decoder_layers(tiny_model)[0].self_attn.o_proj.weight.zero_()
        decoder_layers(tiny_model)[0].mlp.down_proj.weight.zero_()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    done = []
    kl = layer_sensitivity(tiny_model, ids, 2, -1, False, on_progress=lambda i, n: done.append((i, n)))
    assert len(kl) == 2 and kl[0] < 1e-7 < 1e-4 < kl[1]
    assert done == [(0, 2), (1, 2)]
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert layer_sensitivity(tiny_model, ids, 8, -1, False)[1] < kl[1] / 100  # a finer grid, a smaller change
    assert choose_layers(kl, [1, 1], 0.5) == [1]


def test_choose_layers_spends_the_budget_on_sensitivity_per_weight():
    assert choose_layers([0.1, 0.5, 0.2, 0.05], [1, 1, 1, 1], 0.5) == [1, 2]
    assert choose_layers([0.1, 0.5, 0.2, 0.05], [1, 1, 1, 1], 0.0) == []
    assert choose_layers([0.1, 0.5, 0.2, 0.05], [1, 1, 1, 1], 1.0) == [0, 1, 2, 3]
    # layer 1 is the most sensitive but weighs 3: per weight, layers 2 and 0 come first; 1 no longer fits
    assert choose_layers([0.1, 0.5, 0.2, 0.05], [1, 3, 1, 1], 0.4) == [0, 2]
    with pytest.raises(ValueError, match="share"):
        choose_layers([0.1], [1], 1.5)


def test_mixed_gptq_stage_keeps_the_sensitive_layers_on_the_finer_grid(tmp_path, tiny_model_dir, tiny_data_dir):
    one = tmp_path / "one"
    run_stage(stage_config("gptq", bits=3, group_size=32), tiny_model_dir, one, data_dir=tiny_data_dir,
              teacher_dir=tiny_model_dir)
    mixed = tmp_path / "mixed"
    stats = run_stage(stage_config("gptq", bits=3, group_size=32, mixed={"share": 0.5, "windows": 2, "tokens": 32},
                                   head_bits=8, scale_format="log8"),
                      tiny_model_dir, mixed, data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    search = json.loads((mixed / "search" / "sensitivity.json").read_text())
    assert stats["search"] == ["grids", "sensitivity"] and len(search["kl"]) == 2
    fine = search["fine_layers"]
    assert fine == [max(range(2), key=lambda i: search["kl"][i])]  # half the weights: the more sensitive layer
    layers = quantized_modules(load_model(mixed))
    assert (layers.pop("lm_head").bits, len(layers)) == (8, 14)  # head_bits: the output head too
    for name, m in layers.items():
        fine_layer = f"layers.{fine[0]}." in name
        assert (m.bits, m.group_size) == ((8, -1) if fine_layer else (3, 32)), name
        assert m.scale_format == ("float16" if fine_layer else "log8"), name  # log8 is the main grid's
        if fine_layer:  # symmetric by default: zero points at 128, the int8 kernel needs no correction
            assert bool((m.zeros == 128).all()) and m.kernel_path() == "int8", name
    assert 3 < stats["bits_per_weight"] < 8
    ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = load_model(tiny_model_dir)(ids).logits
        errors = {p.name: ((load_model(p)(ids).logits - reference) ** 2).mean().item() for p in (one, mixed)}
    assert errors["mixed"] < 0.8 * errors["one"]


@pytest.mark.parametrize("mixed, stream, says", [
    ({"share": 0.3}, True, "needs stream: false"),
    ({"share": 0}, False, "stages.0.mixed.share: Input should be greater than 0"),
    ({"share": 0.3, "group_size": 48}, False, "got 48"),
])
def test_mixed_precision_is_refused_where_it_cannot_run(mixed, stream, says):
    with pytest.raises(RecipeError, match=says):
        recipe_from_dict({"stages": [{"method": "gptq", "stream": stream, "mixed": mixed}]})


@pytest.mark.parametrize("fine, stage_symmetric, expected", [
    ({"bits": 8}, False, True),  # 8 bits: symmetric unless asked otherwise
    ({"bits": 8, "symmetric": False}, False, False),
    ({"bits": 4, "group_size": 32}, False, False),  # a 4-bit fine grid keeps the stage's zero points
    ({"bits": 4, "group_size": 32}, True, True),
])
def test_fine_grid_symmetry(tiny_model, fine, stage_symmetric, expected):
    from frugalflow.quant.gptq import mixed_layers

    stage = stage_config("gptq", bits=3, group_size=64, symmetric=stage_symmetric,
                         mixed={"share": 0.5, "windows": 1, "tokens": 16, **fine})
    found, grids = mixed_layers(tiny_model, torch.randint(0, 384, (1, 16)), stage)
    assert [g[2] for g in grids.values()] == [expected] and found["fine_grid"][2] is expected
