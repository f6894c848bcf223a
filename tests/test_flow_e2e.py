"""The whole nightly flow on a tiny model: real DVC stages, a real Prefect run under the test
harness, a real MLflow sqlite store and registry, checked through MlflowClient."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, client_for, make_project, run_flow, tiny_recipe

from tasks import registry as R

MODEL = "tiny-frugal"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    recipe = tiny_recipe(tiny_model_dir, "tiny-e2e", registry={"model_name": MODEL})
    return make_project(tmp_path_factory.mktemp("project"), recipe)


@pytest.fixture(scope="module")
def two_runs(prefect_harness, project):
    first = run_flow(project)
    second = run_flow(project, force=True)  # same inputs: without --force it would register nothing (test_unchanged_night)
    return first, second


def test_first_run_records_everything(two_runs, project, tmp_path):
    first, _ = two_runs
    client = client_for(project)
    exp = client.get_experiment_by_name("tiny-e2e")
    run = client.get_run(first["run_id"])
    # parent run: params, metrics, tags, artifacts
    assert run.data.params["stages.0.method"] == "magnitude" and run.data.params["stages.1.bits"] == "4"
    m = run.data.metrics
    for key in ("candidate.ppl", "candidate.size_mb", "candidate.sparsity", "candidate.bits_per_weight",
                "candidate.decode_tps", "baseline.ppl", "gate.ppl_increase_pct", "gate.size_reduction.passed"):
        assert key in m, key
    assert 0.45 < m["candidate.sparsity"] < 0.55
    assert m["candidate.size_mb"] * 2 <= m["baseline.size_mb"]
    assert 4 <= m["candidate.bits_per_weight"] < 6
    tags = run.data.tags
    assert len(tags["git_commit"]) == 40 and tags["dvc.models/base"] and tags["dvc.data"]
    assert tags["prefect.flow_run_id"] and tags["frugalflow.verdict"] == "pass"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "verdict.json", "report", "model"} <= top
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.json", "report/report.md", "report/report.html", "report/plots"} <= report
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "report/plots")}
    assert {"report/plots/ppl_vs_size.png", "report/plots/ppl_vs_speed.png", "report/plots/layer_errors.png",
            "report/plots/training-2.png"} <= plots, plots
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/quantization.json" in model_files and "model/model.safetensors" in model_files
    meta = json.loads(Path(client.download_artifacts(run.info.run_id, "model/quantization.json", str(tmp_path)))
                      .read_text())
    assert meta["tied_embedding"] == "model.embed_tokens" and meta["modules"]["lm_head"]["bits"] == 8
    # one child run per stage, in order, with per-stage metrics
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["0-prune-magnitude", "1-quantize-rtn", "2-distill-kl"]
    by_name = {c.info.run_name: c for c in children}
    assert by_name["0-prune-magnitude"].data.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    searched = {a.path for a in client.list_artifacts(by_name["0-prune-magnitude"].info.run_id, "search")}
    assert searched == {"search/sparsity.json"}  # the method's search result, logged with its stage
    loss_history = client.get_metric_history(by_name["2-distill-kl"].info.run_id, "loss")
    assert [h.step for h in loss_history] == [1, 2, 3]
    # registry: version 1 is challenger and champion, with verdict and lineage tags
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    promotion = {k: v for k, v in first["promotion"].items() if k != "replaced"}  # the champion before it: none
    assert promotion == {"registered": True, "version": "1", "champion": True} and first["promotion"].get("replaced") is None
    assert version.tags["verdict"] == "pass" and version.tags["git_commit"] == tags["git_commit"]
    # the version is the pyfunc LoggedModel of the run, and it generates text
    assert version.source.startswith("models:/m-")
    assert [o.model_id for o in run.outputs.model_outputs] == [version.source.removeprefix("models:/")]
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(client.tracking_uri):
        out = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(["def f(x):"], params={"max_new_tokens": 3})
    assert len(out) == 1 and isinstance(out[0], str)


def test_second_run_reuses_data_and_stages(two_runs, project):
    first, second = two_runs
    assert first["lineage"]["dvc_stages_run"] and second["lineage"]["dvc_stages_run"] == []
    assert all(s["cached"] for s in second["stages"]) and not any(s["cached"] for s in first["stages"])
    assert second["baseline"]["cached"] and second["candidate"]["cached"]
    assert second["candidate"]["ppl"] == first["candidate"]["ppl"]
    client = client_for(project)
    # equal perplexity does not beat the champion: v2 is challenger, champion stays v1
    assert second["promotion"] == {"registered": True, "version": "2", "champion": False}
    assert client.get_model_version_by_alias(MODEL, "champion").version == 1
    assert client.get_model_version_by_alias(MODEL, "challenger").version == 2


def test_failing_candidate_gets_no_version(two_runs, project):
    result = run_flow(project, ["gates.max_ppl=0.5"])
    assert not result["verdict"]["passed"] and result["promotion"]["registered"] is False
    client = client_for(project)
    run = client.get_run(result["run_id"])
    assert run.data.tags["frugalflow.verdict"] == "fail" and "ppl" in run.data.tags["frugalflow.verdict_reasons"]
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_cli_promote_rollback_and_runs(two_runs, project):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args, "-p", str(project / "params.yaml")],
                              capture_output=True, text=True, cwd=ROOT)

    out = cli("promote", "2", "--reason", "manual check")
    assert out.returncode == 0, out.stderr
    client = client_for(project)
    assert client.get_model_version_by_alias(MODEL, "champion").version == 2
    history = R.history(client, MODEL)
    assert history[-1]["version"] == "2" and history[-1]["reason"] == "manual check" and history[-1]["at"]
    out = cli("rollback", "--reason", "regression")
    assert out.returncode == 0, out.stderr
    assert client.get_model_version_by_alias(MODEL, "champion").version == 1
    out = cli("promote", "99", "--reason", "x")
    assert out.returncode == 2 and "no version '99'; its versions: 1 (champion), 2" in out.stderr, out.stderr
    table = cli("runs")
    assert table.returncode == 0 and table.stdout.count("tiny-e2e") >= 2 and "(champion)" in table.stdout
    assert "eval %" in table.stdout.splitlines()[0]  # the change against the base, beside ppl
    first, second = (r["run_id"][:8] for r in two_runs)
    side = cli("compare", first, second)
    assert side.returncode == 0, side.stderr
    assert side.stdout.splitlines()[0].split() == [first, second] and "magnitude -> rtn -> kl" in side.stdout
    assert "1 (champion)" in side.stdout
    bad = cli("compare", "ffffffff")
    assert bad.returncode == 2 and "ffffffff" in bad.stderr and first in bad.stderr


def test_unreachable_tracking_server_fails_fast(prefect_harness, project):
    from frugalflow.config import RecipeError

    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        run_flow(project, ["tracking.uri=http://127.0.0.1:9"])
    with pytest.raises(RecipeError, match="DVC stages"):
        run_flow(project, ["data.window=32"])


def test_recipe_files_take_dvc_owned_sections_from_params(project):
    from flows.nightly import project_root
    from frugalflow.config import RecipeError
    from frugalflow.recipe_io import load_recipe

    sub = project / "recipes"
    sub.mkdir(exist_ok=True)
    recipe_file = sub / "other.yaml"
    recipe_file.write_text("name: other\nstages:\n  - method: rtn\n")
    assert project_root(recipe_file) == project
    recipe = load_recipe(recipe_file, [], checks="run")
    assert recipe.base_model.source == "local" and recipe.data.window == 64  # from params.yaml
    recipe_file.write_text("name: other\ndata: {window: 128}\nstages:\n  - method: rtn\n")
    with pytest.raises(RecipeError, match="data: differs"):
        load_recipe(recipe_file, [], checks="run")


def test_export_from_the_registry(two_runs, project, tmp_path, monkeypatch, capsys):
    """A deploy step knows only the alias: `frugalflow export models:/NAME@champion` gets the GGUF and
    the compressed-tensors folder the flow attached to that version (tensor for tensor what a local
    export of the version's model writes), from a folder that is not the project, given the tracking URI."""
    import gguf

    from flows.cli import main

    client = client_for(project)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.tags["serving.gguf"] == "serving/model.gguf"
    assert version.tags["serving.compressed-tensors"] == "serving/compressed-tensors"
    monkeypatch.chdir(tmp_path)

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["export", *args, "--tracking-uri", client.tracking_uri])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = cli(f"models:/{MODEL}@champion", "--format", "gguf", "--out", "m.gguf")
    assert code == 0, err
    assert f"{MODEL} version {version.version}; downloaded the file the flow attached" in out
    model_dir = client.download_artifacts(version.run_id, "model", str(tmp_path / "dl"))
    assert main(["export", model_dir, "--format", "gguf", "--out", "local.gguf"]) == 0
    attached, exported = gguf.GGUFReader(tmp_path / "m.gguf"), gguf.GGUFReader(tmp_path / "local.gguf")
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in attached.tensors] == \
        [(t.name, t.tensor_type, t.data.tobytes()) for t in exported.tensors]
    fields = {k for k in attached.fields if k != "general.name"}  # the folder's name: the stage's key vs "model"
    assert all(attached.fields[k].contents() == exported.fields[k].contents() for k in fields)
    assert attached.fields["tokenizer.ggml.pre"].contents() == "gpt-2"

    code, _, err = cli(f"models:/{MODEL}/{version.version}", "--format", "compressed-tensors", "--out", "ct")
    assert code == 0, err
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    # an option the attached file was not written with: exported from the version's model instead
    code, out, err = cli(f"models:/{MODEL}@champion", "--format", "gguf", "--out", "m32.gguf", "--float-type", "f32")
    assert code == 0 and "exported its model" in out and "other floats F32" in out, err
    # what is refused: an existing file, an unknown alias, a URI that is not the registry's
    assert cli(f"models:/{MODEL}@champion", "--format", "gguf", "--out", "m.gguf")[0] == 2
    code, _, err = cli(f"models:/{MODEL}@nosuch", "--format", "gguf", "--out", "x.gguf")
    assert code == 2 and "nosuch" in err, err
    code, _, err = cli("models:/m-123abc", "--format", "gguf", "--out", "x.gguf")
    assert code == 2 and "models:/NAME@ALIAS" in err, err
