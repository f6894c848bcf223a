"""Sweep grids: option parsing, expansion order, labels, and overrides the recipe loader accepts;
the choice among evaluated candidates (Pareto front, then the best passing one)."""
from __future__ import annotations

from pathlib import Path

import pytest

from frugalflow.config import RecipeError
from frugalflow.recipe_io import load_recipe
from frugalflow.sweep import Candidate, as_overrides, expand_grid, label, parse_grid_option, select, summary_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_parse_grid_option_reads_yaml_scalars():
    assert parse_grid_option("stages.0.sparsity=0.1, 0.3") == ("stages.0.sparsity", [0.1, 0.3])
    assert parse_grid_option("stages.1.bits=4,8") == ("stages.1.bits", [4, 8])
    assert parse_grid_option("stages.0.pattern=2:4,unstructured") == ("stages.0.pattern", ["2:4", "unstructured"])


@pytest.mark.parametrize("bad", ["stages.0.sparsity", "stages.0.sparsity=", "=0.1,0.2", "stages.0.sparsity= , "])
def test_parse_grid_option_rejects_malformed(bad):
    with pytest.raises(RecipeError, match="KEY=V1,V2"):
        parse_grid_option(bad)


def test_expand_grid_is_the_full_product_last_key_fastest():
    points = expand_grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert points == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
                      {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]
    assert expand_grid({}) == [{}]


def test_label_and_overrides_round_trip_through_the_recipe_loader(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("stages:\n  - {method: wanda, sparsity: 0.1}\n  - {method: rtn, bits: 4}\n")
    point = {"stages.0.pattern": "2:4", "stages.1.bits": 8}
    assert label(point) == "pattern=2:4,bits=8"
    recipe = load_recipe(params, as_overrides(point))
    assert recipe.stages[0].pattern == "2:4" and recipe.stages[1].bits == 8


def test_recipe_sweep_section_is_validated(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("stages:\n  - {method: rtn}\nsweep:\n  grid:\n    data.window: [256, 512]\n")
    with pytest.raises(RecipeError, match="cannot be swept"):
        load_recipe(params)
    params.write_text("stages:\n  - {method: rtn}\nsweep:\n  grid:\n    stages.0.bits: [4, 8]\n  max_parallel: 0\n")
    with pytest.raises(RecipeError, match="max_parallel"):
        load_recipe(params)


def test_override_keeps_n_m_patterns_as_strings(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("stages:\n  - {method: sparsegpt}\n")
    assert load_recipe(params, ["stages.0.pattern=2:4"]).stages[0].pattern == "2:4"


def evaluated(name: str, ppl: float, size: float, tps: float, passed: bool) -> Candidate:
    return Candidate(name, {"k": name}, recipe=None, run_id=f"run-{name}",
                     metrics={"ppl": ppl, "size_mb": size, "decode_tps": tps}, verdict={"passed": passed})


def test_select_marks_the_front_and_picks_its_best_passing_candidate():
    cands = [evaluated("a", 10.0, 50, 20, True),   # front, passes
             evaluated("b", 9.0, 60, 20, False),   # front (lowest ppl) but fails its gates
             evaluated("c", 11.0, 55, 19, True),   # dominated by a
             evaluated("d", 12.0, 30, 25, True),   # front, passes, worse ppl than a
             Candidate("e", {}, recipe=None, error="RuntimeError: boom")]
    best = select(cands, "ppl")
    assert best is cands[0] and best.selected
    assert [c.pareto for c in cands] == [True, True, False, True, False]
    assert [c.selected for c in cands] == [True, False, False, False, False]
    assert select(cands[:4], "size_mb").label == "d" and not cands[0].selected  # chosen afresh
    select(cands, "ppl")
    rows = [c.record() for c in cands]
    assert rows[4] == {"label": "e", "assignment": {}, "metrics": None, "passed": None, "pareto": False,
                       "selected": False, "run_id": None, "error": "RuntimeError: boom"}
    table = summary_markdown(cands, "ppl")
    assert "| a | 10.000 | 50.000 | 20.000 | pass | yes | **yes** |" in table
    assert "| c | 11.000 | 55.000 | 19.000 | pass |  |  |" in table
    assert "| e | - | - | - | failed to run |  |  |" in table


def test_select_returns_none_when_no_front_candidate_passes():
    cands = [evaluated("a", 10.0, 50, 20, False), evaluated("b", 11.0, 60, 19, True)]  # b is dominated
    assert select(cands, "ppl") is None
    assert not any(c.selected for c in cands) and [c.pareto for c in cands] == [True, False]


def test_cli_sweep_table_marks_selected_and_front_and_shows_errors():
    from flows.tables import render_sweep

    cands = [evaluated("a", 10.0, 50, 20, True), evaluated("c", 11.0, 55, 19, True),
             evaluated("d", 12.0, 30, 25, False), Candidate("e", {}, recipe=None, error="RuntimeError: boom")]
    select(cands, "ppl")
    lines = render_sweep([c.record() for c in cands]).splitlines()
    assert lines[0].split() == ["candidate", "ppl", "size", "MB", "decode", "tok/s", "gates"]
    assert lines[2].split() == ["*", "a", "10.000", "50.0", "20.0", "pass"]
    assert lines[3].split() == ["c", "11.000", "55.0", "19.0", "pass"]
    assert lines[4].split() == ["P", "d", "12.000", "30.0", "25.0", "fail"]
    assert lines[5].split() == ["e", "-", "-", "-", "RuntimeError:", "boom"]


def test_a_sweep_reads_its_recipe_once(monkeypatch):
    """`frugalflow sweep` of a 2 x 2 grid parses params.yaml once: the validation, every candidate, the
    service check and the flow use the source read then (the flow itself: tests/test_sweep_flow.py)."""
    import flows.cli
    import flows.sweep
    from frugalflow import recipe_io

    reads, handed = [], {}
    real_read = recipe_io.read_yaml
    monkeypatch.setattr(recipe_io, "read_yaml", lambda path: reads.append(str(path)) or real_read(path))
    monkeypatch.setattr(flows.cli, "_services_or_exit", lambda recipe, source: handed.update(services=source))
    monkeypatch.setattr(flows.cli, "_before_flow", lambda: None)
    monkeypatch.setattr(flows.sweep, "runner_for", lambda workers, cluster=None: None)

    class Flow:  # stands in for sweep_flow: what the CLI hands it
        def with_options(self, **_):
            return self

        def __call__(self, **kwargs):
            handed.update(kwargs)
            return {"run_id": "r", "candidates": [], "selected": None, "promotion": {"registered": False}}

    monkeypatch.setattr(flows.sweep, "sweep_flow", Flow())
    params = ROOT / "params.yaml"
    code = flows.cli.main(["sweep", "-p", str(params), "-g", "stages.0.sparsity=0.1,0.3", "-g", "name=a,b"])
    assert code == 0
    assert reads == [str(params.resolve())]
    assert handed["services"] is handed["source"] and handed["source"].path == params.resolve()
    assert handed["source"].model_dump() == {"path": str(params.resolve())}  # a flow-run parameter: the path only
