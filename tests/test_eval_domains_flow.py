"""The nightly flow with out-of-domain sets on a tiny model: every set is evaluated, gated (the
worst decides) and shown side by side; the speed gate races the candidate against the base
model in the same evaluation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import ROOT, client_for, make_project, run_flow, tiny_recipe

SETS = {"fiction": {"text_files": ["evals/domains/fiction/*.txt"], "max_windows": 3},
        "legal": {"text_files": ["evals/domains/legal/*.txt"], "max_windows": 3}}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    recipe = tiny_recipe(tiny_model_dir, "tiny-domains", registry={"model_name": "tiny-domains"},
                         evaluation={"sets": SETS, "decode_race_rounds": 2},
                         gates={"min_decode_speedup": 0.01})
    proj = tmp_path_factory.mktemp("domains")
    shutil.copytree(ROOT / "evals" / "domains", proj / "evals" / "domains")
    return make_project(proj, recipe)


@pytest.fixture(scope="module")
def first(prefect_harness, project):
    return run_flow(project)


def test_every_set_is_evaluated_gated_and_reported(first, project):
    cand, base = first["candidate"], first["baseline"]
    for name in ("fiction", "legal"):
        assert cand[f"windows.{name}"] == 3 and cand[f"ppl.{name}"] > 0 and base[f"ppl.{name}"] > 0
    gate = next(g for g in first["verdict"]["gates"] if g["name"] == "ppl_increase_pct")
    per_set = {m: (cand[m] / base[m] - 1) * 100 for m in ("ppl", "ppl.fiction", "ppl.legal")}
    assert gate["per_set"] == pytest.approx(per_set, abs=1e-3)
    assert gate["worst"] == max(per_set, key=per_set.get) and gate["value"] == pytest.approx(max(per_set.values()),
                                                                                             abs=1e-3)
    client = client_for(project)
    run = client.get_run(first["run_id"])
    assert run.data.metrics["candidate.ppl.fiction"] == pytest.approx(cand["ppl.fiction"])
    assert run.data.metrics["gate.ppl_increase_pct.ppl.legal"] == pytest.approx(per_set["ppl.legal"], abs=1e-3)
    report = Path(client.download_artifacts(first["run_id"], "report/report.md")).read_text()
    table = report.split("## Perplexity by set", 1)[1].split("\n## ", 1)[0]
    assert all(name in table for name in ("eval (prepared split)", "fiction", "legal", "(worst)"))
    verdict = json.loads(Path(client.download_artifacts(first["run_id"], "verdict.json")).read_text())
    assert verdict["gates"][0]["per_set"].keys() == per_set.keys()


def test_speed_gate_races_the_base_model_in_the_same_evaluation(first):
    cand = first["candidate"]
    assert cand["decode_race_rounds"] == 2 and cand["base_decode_tps"] > 0
    assert cand["decode_speedup"] == pytest.approx(cand["decode_tps"] / cand["base_decode_tps"])
    gate = next(g for g in first["verdict"]["gates"] if g["name"] == "decode_speedup")
    assert gate["reference"] == "base model, interleaved in the same evaluation"
    assert gate["value"] == pytest.approx(cand["decode_speedup"], rel=1e-3)


def test_the_worst_set_fails_the_run(first, project):
    """Same recipe, limit just under the worst set's increase: the verdict fails on that set,
    whichever it is, while every other set is within the limit."""
    gate = next(g for g in first["verdict"]["gates"] if g["name"] == "ppl_increase_pct")
    others = [v for m, v in gate["per_set"].items() if m != gate["worst"]]
    limit = max(0.0, gate["value"] - 1e-3)
    if max(others) > limit:
        pytest.fail(f"two sets tie for the worst increase: {gate['per_set']}")
    second = run_flow(project, [f"gates.max_ppl_increase_pct={limit}"])
    assert not second["verdict"]["passed"]
    assert second["verdict"]["reasons"][0].startswith("ppl_increase_pct") and gate["worst"] in \
        second["verdict"]["reasons"][0]
    assert second["promotion"]["registered"] is False
