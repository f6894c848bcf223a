"""`tasks.compare` and `flows.tables.render_compare`: flow runs side by side, built from runs recorded in a temporary sqlite
store with the tags, params and metrics the nightly flow logs (no flow run needed)."""
from __future__ import annotations

import re
import shutil
import types
import uuid

import pytest
from mlflow import MlflowClient

from flows.tables import render_compare
from tasks.compare import compare_runs, resolve_runs, stages_of

MODEL = "cmp-model"


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """A migrated, empty sqlite store, made once: creating the tables takes seconds, a copy doesn't."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def client(empty_db, tmp_path):
    path = tmp_path / "mlflow.db"
    shutil.copy(empty_db, path)
    uri = f"sqlite:///{path}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def experiment(client, tmp_path):
    return client.create_experiment("cmp", artifact_location=(tmp_path / "artifacts").as_uri())


def flow_run(client, experiment, recipe, methods, verdict, baseline=None, candidate=None, version=None,
             params=None):
    """A parent run as the nightly flow records it."""
    run = client.create_run(experiment, run_name=f"{recipe}-x", tags={"frugalflow.recipe": recipe,
                                                                     "frugalflow.verdict": verdict})
    run_id = run.info.run_id
    for i, method in enumerate(methods):
        client.log_param(run_id, f"stages.{i}.method", method)
    client.log_param(run_id, "name", recipe)
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    for prefix, metrics in (("baseline", baseline or {}), ("candidate", candidate or {})):
        for key, value in metrics.items():
            client.log_metric(run_id, f"{prefix}.{key}", value)
    if version is not None:
        client.set_tag(run_id, "frugalflow.registered_version", str(version))
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture
def runs(client, experiment):
    base = {"ppl": 20.0, "size_mb": 270.0, "decode_tps": 30.0}
    a = flow_run(client, experiment, "magnitude-rtn-kl", ["magnitude", "rtn", "kl"], "pass", base,
                 {"ppl": 22.0, "size_mb": 67.5, "decode_tps": 45.0}, version=1)
    b = flow_run(client, experiment, "sparsegpt-awq", ["sparsegpt", "awq"], "fail", base,
                 {"ppl": 30.0, "size_mb": 90.0, "decode_tps": 60.0})
    c = flow_run(client, experiment, "broken", ["rtn"], "-", base)  # failed before the candidate was evaluated
    child = client.create_run(experiment, run_name="0-prune-magnitude",
                              tags={"mlflow.parentRunId": a, "frugalflow.stage": "prune"}).info.run_id
    client.create_registered_model(MODEL)
    v = client.create_model_version(MODEL, source=f"{client.get_run(a).info.artifact_uri}/model", run_id=a)
    client.set_registered_model_alias(MODEL, "champion", str(v.version))
    return {"a": a, "b": b, "c": c, "child": child}


def row_cells(text: str, label: str) -> list[str]:
    """The cells after `label` on its line of the rendered table (cells are separated by 2+ spaces)."""
    for line in text.splitlines():
        if line.startswith(label + "  ") or line == label:
            return re.split(r"\s{2,}", line[len(label):].strip())
    raise AssertionError(f"no row {label!r} in\n{text}")


def test_rows_take_prefixes_full_ids_and_keep_the_order_given(client, runs):
    a, b = runs["a"], runs["b"]
    rows = compare_runs(client, [b[:8], a], model_name=MODEL)
    assert [r["run"] for r in rows] == [b[:8], a[:8]]
    rb, ra = rows
    assert ra["recipe"] == "magnitude-rtn-kl" and ra["stages"] == "magnitude -> rtn -> kl"
    assert rb["stages"] == "sparsegpt -> awq" and rb["verdict"] == "fail" and ra["verdict"] == "pass"
    assert ra["status"] == "FINISHED" and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", ra["started"])
    assert ra["ppl_increase_pct"] == pytest.approx(10.0) and rb["ppl_increase_pct"] == pytest.approx(50.0)
    assert ra["size_reduction"] == pytest.approx(4.0) and rb["size_reduction"] == pytest.approx(3.0)
    assert ra["speedup"] == pytest.approx(1.5) and rb["speedup"] == pytest.approx(2.0)
    assert (ra["baseline_ppl"], ra["candidate_ppl"], ra["candidate_size_mb"], ra["candidate_tps"]) == (
        20.0, 22.0, 67.5, 45.0)
    assert ra["version"] == "1 (champion)" and rb["version"] == "-"
    assert compare_runs(client, [a[:8]])[0]["version"] == "1"  # no model name: no champion lookup


def test_render_puts_runs_side_by_side(client, runs):
    a, b, c = runs["a"], runs["b"], runs["c"]
    text = render_compare(compare_runs(client, [a[:8], b[:8], c[:10]], model_name=MODEL))
    lines = text.splitlines()
    assert lines[0].split() == [a[:8], b[:8], c[:8]]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert row_cells(text, "recipe") == ["magnitude-rtn-kl", "sparsegpt-awq", "broken"]
    assert row_cells(text, "stages") == ["magnitude -> rtn -> kl", "sparsegpt -> awq", "rtn"]
    assert row_cells(text, "verdict") == ["pass", "fail", "-"]
    assert row_cells(text, "baseline ppl") == ["20.00", "20.00", "20.00"]
    assert row_cells(text, "candidate ppl") == ["22.00", "30.00", "-"]
    assert row_cells(text, "ppl increase %") == ["10.00", "50.00", "-"]
    assert row_cells(text, "candidate size MB") == ["67.50", "90.00", "-"]
    assert row_cells(text, "size reduction x") == ["4.00", "3.00", "-"]
    assert row_cells(text, "candidate tok/s") == ["45.00", "60.00", "-"]
    assert row_cells(text, "speedup x") == ["1.50", "2.00", "-"]
    assert row_cells(text, "version") == ["1 (champion)", "-", "-"]
    assert row_cells(text, "name") == ["magnitude-rtn-kl", "sparsegpt-awq", "broken"]  # a differing key
    # each run's cells start where its id does in the header
    for label, cells in (("recipe", ["magnitude-rtn-kl", "sparsegpt-awq", "broken"]),
                         ("version", ["1 (champion)"])):
        line = next(x for x in lines if x.startswith(label + "  "))
        for run_id, value in zip((a, b, c), cells):
            assert line.index(value) == lines[0].index(run_id[:8]), (label, value)


def test_recipe_keys_that_differ_are_listed_in_recipe_order(client, experiment):
    same = {"seed": "0", "stages.1.bits": "4"}
    a = flow_run(client, experiment, "r", ["wanda", "gptq"], "pass",
                 params=same | {"stages.0.sparsity": "0.1", "stages.10.x": "1", "stages.2.lr": "5e-05"})
    b = flow_run(client, experiment, "r", ["wanda", "gptq"], "pass",
                 params=same | {"stages.0.sparsity": "0.3", "stages.10.x": "2"})
    text = render_compare(compare_runs(client, [a[:8], b[:8]]))
    labels = [line.split()[0] for line in text.splitlines()[2 + 15:]]  # after the header and the 15 fields
    assert labels == ["stages.0.sparsity", "stages.2.lr", "stages.10.x"], text
    assert row_cells(text, "stages.0.sparsity") == ["0.1", "0.3"]
    assert row_cells(text, "stages.2.lr") == ["5e-05", "-"]  # absent in one run
    assert "seed" not in labels and "stages.1.bits" not in labels and "name" not in labels
    single = render_compare(compare_runs(client, [a[:8]]))
    assert single.splitlines()[-1].startswith("version")  # one run: nothing differs


def test_stages_sort_by_index_not_text():
    params = {f"stages.{i}.method": f"m{i}" for i in (10, 2, 0, 1)} | {"stages.0.bits": "4", "name": "x"}
    assert stages_of(params) == "m0 -> m1 -> m2 -> m10"
    assert stages_of({"name": "x"}) == "-"


def test_unknown_prefix_lists_recent_runs(client, runs):
    with pytest.raises(ValueError) as err:
        compare_runs(client, [runs["a"][:8], "ffffffffff"])
    msg = str(err.value)
    assert "ffffffffff" in msg and "recent runs" in msg
    for key in ("a", "b", "c"):
        assert runs[key][:8] in msg
    assert runs["child"][:8] not in msg  # stage runs are not flow runs
    with pytest.raises(ValueError, match="no frugalflow run"):
        resolve_runs(client, [runs["child"][:12]])  # a stage run's id is not a flow run
    with pytest.raises(ValueError, match="not a run id"):
        resolve_runs(client, ["abc'; drop"])
    with pytest.raises(ValueError, match="at least one run"):
        resolve_runs(client, [])


def test_empty_store_says_so(client, experiment):
    with pytest.raises(ValueError, match="no frugalflow runs recorded"):
        compare_runs(client, ["abcd1234"])
    assert render_compare([]) == "no runs to compare"


def test_ambiguous_prefix_is_refused(client, experiment, monkeypatch):
    from mlflow.store.tracking import sqlalchemy_store

    ids = iter([uuid.UUID("abcd0000" + "0" * 24), uuid.UUID("abcd1111" + "1" * 24)])
    monkeypatch.setattr(sqlalchemy_store, "uuid", types.SimpleNamespace(uuid4=lambda: next(ids)))
    first = flow_run(client, experiment, "one", ["rtn"], "pass")
    second = flow_run(client, experiment, "two", ["gptq"], "pass")
    monkeypatch.undo()
    assert (first[:8], second[:8]) == ("abcd0000", "abcd1111")
    with pytest.raises(ValueError, match="matches several runs.*abcd0000.*give more characters"):
        resolve_runs(client, ["ABCD"])
    assert [r.info.run_id for r in resolve_runs(client, ["ABCD1"])] == [second]
