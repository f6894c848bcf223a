"""A night with unchanged inputs registers nothing (issue #40 item 1): the real nightly flow on the tiny
model, a real Prefect run under the test harness, a real MLflow sqlite store and registry.

Same final stage, evaluation inputs and gates as a registered version -> a FINISHED run tagged
`frugalflow.verdict=unchanged` naming that version, no stage run, no evaluation, no `model/`, no
version. A stage parameter, the data or a gate threshold changed -> a candidate as before;
`force` registers anyway; a night whose candidate failed its gates runs again in full."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from helpers import client_for, git, make_project, run_flow, tiny_recipe

MODEL = "tiny-unchanged"
SECONDS: dict[str, float] = {}


def night(project: Path, name: str, overrides: list[str] | None = None, force: bool = False) -> dict:
    started = time.monotonic()
    result = run_flow(project, overrides, force=force)
    SECONDS[name] = round(time.monotonic() - started, 1)
    return result


def versions(project: Path) -> list[int]:
    return sorted(int(v.version) for v in client_for(project).search_model_versions(f"name = '{MODEL}'"))


def version_tags(project: Path, number: int) -> dict:
    return client_for(project).get_model_version(MODEL, str(number)).tags


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    recipe = tiny_recipe(tiny_model_dir, "tiny-unchanged", evaluation={"decode_race_rounds": 1})
    return make_project(tmp_path_factory.mktemp("project"), recipe)


@pytest.fixture(scope="module")
def two_nights(prefect_harness, project):
    first = night(project, "first night")
    again = night(project, "same inputs")
    yield first, again
    print("\nseconds per night: " + ", ".join(f"{k} {v}" for k, v in SECONDS.items()))


def test_same_inputs_register_nothing(two_nights, project, tmp_path):
    first, again = two_nights
    client = client_for(project)
    assert first["unchanged"] is None and first["promotion"]["version"] == "1"
    assert again["unchanged"]["version"] == "1" and again["unchanged"]["run_id"] == first["run_id"]
    assert again["promotion"] == {"registered": False, "version": None, "champion": False}
    assert versions(project) == [1]
    # the key was known before any stage ran: the folder the last stage then wrote, and v1's model key
    assert again["unchanged"]["final_stage"] == Path(first["stages"][-1]["dir"]).name == \
        version_tags(project, 1)["frugalflow.model_key"]
    run = client.get_run(again["run_id"])
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["frugalflow.verdict"] == "unchanged" and tags["frugalflow.unchanged_version"] == "1"
    assert tags["frugalflow.inputs_key"] == version_tags(project, 1)["frugalflow.inputs_key"] == \
        client.get_run(first["run_id"]).data.tags["frugalflow.inputs_key"]
    # nothing evaluated, logged or registered: no metrics, no model, no stage runs, a note
    assert not run.data.metrics and "frugalflow.registered_version" not in tags
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"recipe.yaml", "unchanged.md"}
    note = Path(client.download_artifacts(run.info.run_id, "unchanged.md", str(tmp_path))).read_text()
    assert f"{MODEL} version 1" in note and "--force" in note
    assert not client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert not client.search_model_versions(f"run_id = '{run.info.run_id}'")


def test_cli_says_unchanged(two_nights, project, capsys):
    from flows.cli import main, run_summary

    first, again = two_nights
    summary = run_summary(again)
    assert f"run {again['run_id']}: unchanged: same inputs as version 1; nothing registered" in summary
    assert main(["runs", "-p", str(project / "params.yaml")]) == 0
    table = capsys.readouterr().out.splitlines()
    [row] = [line for line in table if line.startswith(again["run_id"][:8])]
    assert "unchanged" in row and "same as 1 (champion)" in row, table
    assert main(["compare", first["run_id"][:8], again["run_id"][:8], "-p", str(project / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["verdict", "pass"] and "unchanged" in line for line in out.splitlines()), out


def test_a_stage_parameter_makes_a_new_candidate(two_nights, project):
    changed = night(project, "stage parameter changed", ["stages.2.lr=0.0002"])
    assert changed["unchanged"] is None and changed["promotion"]["version"] == "2"
    assert not any(s["cached"] for s in changed["stages"][2:]) and all(s["cached"] for s in changed["stages"][:2])
    assert versions(project) == [1, 2]
    again = night(project, "same changed inputs", ["stages.2.lr=0.0002"])
    assert again["unchanged"]["version"] == "2" and versions(project) == [1, 2]


def test_a_gate_threshold_makes_a_new_candidate(two_nights, project):
    """The same model under other gates is judged and registered again."""
    gated = night(project, "gate changed", ["gates.min_size_reduction=1.5"])
    assert gated["unchanged"] is None and gated["verdict"]["passed"] and gated["promotion"]["registered"]
    number = int(gated["promotion"]["version"])
    assert version_tags(project, number)["frugalflow.model_key"] == version_tags(project, 1)["frugalflow.model_key"]
    assert version_tags(project, number)["frugalflow.inputs_key"] != version_tags(project, 1)["frugalflow.inputs_key"]


def test_a_failed_night_runs_again(two_nights, project):
    """A candidate that failed its gates registers no version, so the same night again is judged again."""
    before = versions(project)
    for name in ("failing gate", "failing gate again"):
        failed = night(project, name, ["gates.max_ppl=0.5"])
        assert failed["unchanged"] is None and not failed["verdict"]["passed"]
        assert client_for(project).get_run(failed["run_id"]).data.tags["frugalflow.verdict"] == "fail"
    assert versions(project) == before


def test_force_registers_anyway(two_nights, project):
    forced = night(project, "forced", force=True)
    number = int(forced["promotion"]["version"])
    assert forced["unchanged"] is None and number == max(versions(project))
    assert client_for(project).get_run(forced["run_id"]).data.tags["frugalflow.forced"] == "True"
    assert version_tags(project, number)["frugalflow.inputs_key"] == version_tags(project, 1)["frugalflow.inputs_key"]
    after = night(project, "after forced")
    assert after["unchanged"]["version"] == str(number)  # the newest version with these inputs


def test_new_data_makes_a_new_candidate(two_nights, project):
    """Other prepared data (a DVC-owned key in params.yaml, committed): every stage and evaluation anew."""
    params = project / "params.yaml"
    recipe = yaml.safe_load(params.read_text())
    recipe["data"]["eval_windows"] = 5
    params.write_text(yaml.safe_dump(recipe, sort_keys=False))
    git(project, "commit", "-qam", "fewer eval windows")
    before = versions(project)
    result = night(project, "new data")
    assert result["lineage"]["dvc_stages_run"] and result["unchanged"] is None
    assert not any(s["cached"] for s in result["stages"])
    assert versions(project) == [*before, max(before) + 1]


def test_only_finished_runs_versions_count(tmp_path):
    """A version a killed run left (`frugalflow.run_failed`) is adopted by the rerun, not taken as unchanged."""
    from mlflow import MlflowClient

    from tasks import registry as R

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert R.version_with_inputs(client, "none", "k") is None  # no such model: nothing, no error
    client.create_registered_model("m")
    run = client.create_run(client.create_experiment("e")).info
    for tags in ({R.INPUTS_KEY: "k"}, {R.INPUTS_KEY: "other"}, {R.INPUTS_KEY: "k", R.RUN_FAILED: "killed"}):
        client.create_model_version("m", run.artifact_uri, run.run_id, tags=tags)
    assert str(R.version_with_inputs(client, "m", "k").version) == "1"
    assert str(R.version_with_inputs(client, "m", "other").version) == "2"
    assert R.version_with_inputs(client, "m", "nope") is None


def test_what_enters_the_inputs_key(tiny_data_dir, tmp_path):
    """Base model, data, stages, evaluation settings and files, gates and objective change the key;
    the recipe's name, schedule and tracking do not."""
    from frugalflow.config import Recipe
    from tasks.compress import final_stage_name
    from tasks.unchanged import inputs_key

    (tmp_path / "notes.txt").write_text("a few words of text to evaluate on " * 20)
    base = {"stages": [{"method": "magnitude", "sparsity": 0.5}, {"method": "rtn", "bits": 4}],
            "evaluation": {"sets": {"notes": {"text_files": ["notes.txt"], "window": 16}}}}

    def key(changes: dict | None = None, base_key: str = "b", data_key: str = "d") -> str:
        recipe = Recipe.model_validate({**base, **(changes or {})})
        return inputs_key(final_stage_name(base_key, data_key, recipe.stages), data_key, tiny_data_dir, recipe,
                          tmp_path)

    same = key()
    assert key({"name": "other", "schedule": {"cron": "0 3 * * *"}, "tracking": {"uri": "sqlite:///x.db"}}) == same
    changed = [key(base_key="b2"), key(data_key="d2"),
               key({"stages": [{"method": "magnitude", "sparsity": 0.4}, {"method": "rtn", "bits": 4}]}),
               key({"evaluation": {**base["evaluation"], "decode_tokens": 9}}),
               key({"gates": {"max_ppl": 100.0}}), key({"registry": {"objective": "size_mb"}})]
    assert len({same, *changed}) == 1 + len(changed)
    (tmp_path / "notes.txt").write_text("other words")
    assert key() != same
