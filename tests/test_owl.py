"""OWL: layer sparsities from outlier ratios (mean kept, spread 2 lambda, more outliers -> sparser
less), the recipe stage end to end, and the limit lambda -> 0 being plain Wanda."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import stage_config

from frugalflow.arch import compressible_linears, decoder_layers
from frugalflow.models import load_model
from frugalflow.prune.owl import owl_sparsities
from frugalflow.stages import run_stage


def test_layer_sparsities_keep_the_mean_and_follow_the_outliers():
    ratios = [0.01, 0.05, 0.02, 0.03]
    s = owl_sparsities(ratios, 0.5, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.5)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s.index(min(s)) == 1 and s.index(max(s)) == 0  # most outliers: pruned least
    assert owl_sparsities([0.02, 0.02], 0.4, 0.08) == [0.4, 0.4]


def test_recipe_refuses_n_m_and_out_of_range():
    with pytest.raises(ValueError, match="unstructured"):
        stage_config("owl", pattern="2:4")
    with pytest.raises(ValueError, match="owl_lambda"):
        stage_config("owl", sparsity=0.95, owl_lambda=0.1)


def test_owl_stage_prunes_each_layer_at_its_own_sparsity(tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "owl"
    stats = run_stage(stage_config("owl", sparsity=0.5, owl_lambda=0.1, outlier_m=2.0), tiny_model_dir, out,
                      data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    search = json.loads((out / "search" / "owl.json").read_text())
    model = load_model(out)
    n_layers = len(decoder_layers(model))
    assert len(search["layer_sparsity"]) == len(search["outlier_ratio"]) == n_layers
    assert sum(search["layer_sparsity"]) / n_layers == pytest.approx(0.5)
    assert len(set(search["layer_sparsity"])) > 1  # random weights still differ in outliers
    for name, lin in compressible_linears(model).items():
        layer = int(name.split(".")[2])
        got = (lin.weight == 0).float().mean().item()
        assert got == pytest.approx(search["layer_sparsity"][layer], abs=1.0 / lin.weight.shape[1]), name
        assert stats["layers"][name]["recon_error"] > 0
    assert stats["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert "owl" in stats["search"]


def test_tiny_lambda_is_wanda(tmp_path, tiny_model_dir, tiny_data_dir):
    run_stage(stage_config("owl", sparsity=0.5, owl_lambda=1e-9), tiny_model_dir, tmp_path / "owl",
              data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    run_stage(stage_config("wanda", sparsity=0.5), tiny_model_dir, tmp_path / "wanda",
              data_dir=tiny_data_dir, teacher_dir=tiny_model_dir)
    a, b = compressible_linears(load_model(tmp_path / "owl")), compressible_linears(load_model(tmp_path / "wanda"))
    assert all(torch.equal(a[n].weight, b[n].weight) for n in a)
