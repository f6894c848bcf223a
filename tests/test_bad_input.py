"""Bad input across every command, table-driven: each case asserts the exit code, that the message
names the key or file, and that nothing was recorded (no MLflow run, no registry change, no cache
entry, no output file). Commands run in-process through `flows.cli.main` (a few as subprocesses);
every case fails before Prefect, DVC or any model work starts."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, client_for, make_project, tiny_recipe

from flows.cli import main

MODEL = "tiny-bad-input"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """A project (not run) whose store holds one finished run and one registered version that is
    champion without any recorded history; a lone folder without dvc.yaml; a corrupt model; a busy port."""
    proj = make_project(tmp_path_factory.mktemp("bad-input"), tiny_recipe(tiny_model_dir, MODEL))
    client = client_for(proj)
    exp = client.create_experiment(MODEL, artifact_location=(proj / "mlartifacts").as_uri())
    run = client.create_run(exp, run_name="seed-run", tags={"frugalflow.recipe": MODEL})
    client.set_terminated(run.info.run_id, "FINISHED")
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, source=str(tiny_model_dir), run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", version.version)

    lone = tmp_path_factory.mktemp("lone")  # no dvc.yaml above: validate checks the file alone
    (lone / "empty.txt").write_text("   \n")
    bert = lone / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    corrupt = lone / "corrupt-model"
    corrupt.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_model_dir / f).is_file():
            (corrupt / f).write_bytes((tiny_model_dir / f).read_bytes())
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated
    with socket.socket() as busy:  # a port something else listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield {"proj": proj, "lone": lone, "tiny": tiny_model_dir, "run_id": run.info.run_id,
               "busy_port": str(busy.getsockname()[1])}


def snapshot(proj: Path) -> dict:
    """Everything a command could have recorded: runs, registry versions/aliases/tags, files."""
    client = client_for(proj)
    runs = {r.info.run_id: r.info.status for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id])}
    models = {m.name: (m.aliases, m.tags, sorted((v.version, v.current_stage) for v in
                                                  client.search_model_versions(f"name = '{m.name}'")))
              for m in client.search_registered_models()}
    files = sorted(str(p.relative_to(proj)) for p in proj.rglob("*")
                   if p.is_file() and ".git" not in p.parts and ".dvc" not in p.parts and p.name != "mlflow.db")
    return {"runs": runs, "models": models, "files": files, "experiments": len(client.search_experiments())}


def write(folder: Path, name: str, text: str | bytes) -> str:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def lone_recipe(w, **sections) -> dict:
    recipe = tiny_recipe(w["tiny"], MODEL)
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and isinstance(recipe.get(key), dict) else value
    return recipe


def lone_file(w, name: str, recipe: dict) -> str:
    return write(w["lone"], name, yaml.safe_dump(recipe, sort_keys=False))


# (case id, argv builder, exit code, substrings the message must name)
P = "{params}"
CASES = [
    # ---- validate: the file itself
    ("validate-malformed-yaml", lambda w: ["validate", write(w["lone"], "bad.yaml", "stages: [\n  - method: rtn\n")],
     2, ["bad.yaml", "not valid YAML"]),
    ("validate-unknown-key", lambda w: ["validate", lone_file(w, "unk.yaml", {**lone_recipe(w), "colour": "red"})],
     2, ["colour", "unknown key"]),
    ("validate-wrong-type", lambda w: ["validate", lone_file(w, "type.yaml", lone_recipe(
        w, stages=[{"method": "magnitude", "sparsity": "half"}]))], 2, ["stages.0.sparsity", "half"]),
    ("validate-out-of-range", lambda w: ["validate", lone_file(w, "range.yaml", lone_recipe(
        w, stages=[{"method": "magnitude", "sparsity": 1.5}]))], 2, ["stages.0.sparsity", "1.5"]),
    ("validate-unknown-method", lambda w: ["validate", lone_file(w, "meth.yaml", lone_recipe(
        w, stages=[{"method": "obs"}]))], 2, ["stages.0", "unknown method", "obs"]),
    ("validate-missing-method", lambda w: ["validate", lone_file(w, "nometh.yaml", lone_recipe(
        w, stages=[{"sparsity": 0.5}]))], 2, ["stages.0", "missing 'method'"]),
    ("validate-two-prune-stages", lambda w: ["validate", lone_file(w, "twice.yaml", lone_recipe(
        w, stages=[{"method": "magnitude"}, {"method": "wanda"}]))], 2, ["at most one prune"]),
    ("validate-stages-cannot-chain", lambda w: ["validate", lone_file(w, "chain.yaml", lone_recipe(
        w, stages=[{"method": "rtn"}, {"method": "magnitude"}]))], 2, ["stages.1.method", "rtn -> magnitude"]),
    ("validate-distill-after-int8", lambda w: ["validate", lone_file(w, "int8.yaml", lone_recipe(
        w, stages=[{"method": "dynamic_int8"}, {"method": "kl", "steps": 1}]))], 2, ["stages.1.method", "int8"]),
    ("validate-missing-file", lambda w: ["validate", str(w["lone"] / "nope.yaml")], 2, ["nope.yaml", "not found"]),
    ("validate-directory-not-file", lambda w: ["validate", str(w["lone"])], 2, ["lone", "not a file"]),
    ("validate-not-utf8", lambda w: ["validate", write(w["lone"], "latin.yaml", b"name: caf\xe9\n")],
     2, ["latin.yaml", "UTF-8"]),
    ("validate-top-level-list", lambda w: ["validate", write(w["lone"], "list.yaml", "- a\n- b\n")],
     2, ["list.yaml", "expected a mapping"]),
    ("validate-empty-corpus", lambda w: ["validate", lone_file(w, "empty.yaml", lone_recipe(
        w, data={"corpus": "text_files", "text_files": [str(w["lone"] / "empty.txt")]}))],
     2, ["data.text_files", "empty"]),
    ("validate-corpus-file-missing", lambda w: ["validate", lone_file(w, "nocorpus.yaml", lone_recipe(
        w, data={"corpus": "text_files", "text_files": ["notes/none.txt"]}))], 2, ["data.text_files", "none.txt"]),
    ("validate-unsupported-architecture", lambda w: ["validate", lone_file(w, "bert.yaml", lone_recipe(
        w, base_model={"local_dir": str(w["lone"] / "bert")}))], 2, ["base_model.local_dir", "'bert'"]),
    ("validate-base-model-missing", lambda w: ["validate", lone_file(w, "nomodel.yaml", lone_recipe(
        w, base_model={"local_dir": str(w["lone"] / "gone")}))], 2, ["base_model.local_dir", "gone"]),
    ("validate-eval-set-matches-nothing", lambda w: ["validate", lone_file(w, "sets.yaml", lone_recipe(
        w, evaluation={"sets": {"notes": {"text_files": ["evals/none/*.txt"]}}}))],
     2, ["evaluation.sets.notes.text_files", "evals/none/*.txt"]),
    ("validate-calib-mix-matches-nothing", lambda w: ["validate", lone_file(w, "mix.yaml", lone_recipe(
        w, data={"calib_mix": {"fr": {"text_files": ["corpora/none/*.txt"], "windows": 2}}}))],
     2, ["data.calib_mix.fr.text_files", "corpora/none/*.txt"]),
    ("validate-calib-mix-no-windows", lambda w: ["validate", lone_file(w, "mix0.yaml", lone_recipe(
        w, data={"calib_mix": {"fr": {"text_files": ["x.txt"], "windows": 0}}}))],
     2, ["data.calib_mix.fr.windows", "greater than or equal to 1"]),
    ("validate-lm-eval-folder-missing", lambda w: ["validate", lone_file(w, "lmeval.yaml", lone_recipe(
        w, evaluation={"lm_eval": {"tasks": ["x"], "include_path": "evals/nowhere"}}))],
     2, ["evaluation.lm_eval.include_path", "nowhere"]),
    # ---- validate: overrides, on the project's params.yaml
    ("validate-override-no-equals", lambda w: ["validate", P, "-s", "stages.0.sparsity"], 2, ["KEY=VALUE"]),
    ("validate-override-bad-index", lambda w: ["validate", P, "-s", "stages.9.sparsity=0.1"],
     2, ["stages.9.sparsity", "not an index"]),
    ("validate-override-out-of-range", lambda w: ["validate", P, "-s", "stages.0.sparsity=7"],
     2, ["stages.0.sparsity", "7"]),
    ("validate-override-dvc-owned", lambda w: ["validate", P, "-s", "data.window=256"],
     2, ["data.window=256", "DVC stages"]),
    ("validate-override-unknown-key", lambda w: ["validate", P, "-s", "gates.max_pl=3"], 2, ["gates.max_pl"]),
    # ---- run: refused before Prefect starts
    ("run-override-dvc-owned", lambda w: ["run", "-p", P, "-s", "data.window=256"], 2, ["data.window=256"]),
    ("run-override-out-of-range", lambda w: ["run", "-p", P, "-s", "stages.1.bits=3.5"], 2, ["stages.1.bits"]),
    ("run-missing-params", lambda w: ["run", "-p", str(w["proj"] / "missing.yaml")], 2, ["missing.yaml"]),
    ("run-outside-a-project", lambda w: ["run", "-p", lone_file(w, "lone.yaml", lone_recipe(w))],
     2, ["lone.yaml", "dvc.yaml"]),
    ("run-recipe-contradicts-params", lambda w: ["run", "-p", write(w["proj"], "other.yaml", yaml.safe_dump(
        {**tiny_recipe(w["tiny"], MODEL), "data": {"window": 128}}))], 2, ["data: differs", "params.yaml"]),
    ("run-unknown-option", lambda w: ["run", "-p", P, "--fast"], 2, ["--fast"]),
    # ---- sweep
    ("sweep-no-grid", lambda w: ["sweep", "-p", P], 2, ["no grid"]),
    ("sweep-grid-no-equals", lambda w: ["sweep", "-p", P, "-g", "stages.0.sparsity"], 2, ["stages.0.sparsity",
                                                                                      "KEY=V1,V2"]),
    ("sweep-grid-point-out-of-range", lambda w: ["sweep", "-p", P, "-g", "stages.0.sparsity=0.5,1.5"],
     2, ["sweep candidate sparsity=1.5", "stages.0.sparsity"]),
    ("sweep-grid-key-twice", lambda w: ["sweep", "-p", P, "-g", "stages.0.sparsity=0.1", "-g", "stages.0.sparsity=0.3"],
     2, ["-g stages.0.sparsity given twice", "stages.0.sparsity=V1,V2"]),
    ("sweep-parallel-zero", lambda w: ["sweep", "-p", P, "--parallel", "0", "-g", "stages.0.sparsity=0.1,0.3"],
     2, ["--parallel", "0 is out of range (allowed: 1 or more)"]),
    ("sweep-override-dvc-owned", lambda w: ["sweep", "-p", P, "-s", "data.eval_windows=3", "-g",
                                            "stages.0.sparsity=0.1,0.2"], 2, ["data.eval_windows=3"]),
    # ---- schedule
    ("schedule-unknown-timezone", lambda w: ["schedule", "-p", P, "--check", "-s", "schedule.timezone=Mars/Olympus"],
     2, ["schedule.timezone", "Mars/Olympus"]),
    ("schedule-bad-cron", lambda w: ["schedule", "-p", P, "--check", "-s", "schedule.cron=61 * * * *"],
     2, ["schedule.cron", "61 * * * *"]),
    # ---- the schedule (as `schedule` refuses it above) and duplicate keys: validate refuses what run and sweep do
    *[(f"{cmd}-{what}", (lambda argv: lambda w: argv)(argv), 2, needles)
      for cmd, opts in (("validate", ["-p", P]), ("run", ["-p", P]), ("sweep", ["-p", P, "-g", "stages.0.sparsity=0.1,0.2"]))
      for what, setting, needles in (
          ("cron-minute-61", "schedule.cron=61 2 * * *", ["schedule.cron", "61 2 * * *", "minute 0-59"]),
          ("unknown-timezone", "schedule.timezone=Europe/Pariss", ["schedule.timezone", "Europe/Pariss", "IANA",
                                                                   "did you mean Europe/Paris"]))
      for argv in [[cmd, *opts, "-s", setting]]],
    ("validate-duplicate-key", lambda w: ["validate", write(w["lone"], "dup.yaml", yaml.safe_dump(
        lone_recipe(w), sort_keys=False) + "schedule:\n  cron: '0 2 * * *'\n  cron: '0 3 * * *'\n")],
     2, ["dup.yaml", "schedule.cron: key given twice", "remove one"]),
    ("run-duplicate-key", lambda w: ["run", "-p", write(w["proj"], "dup.yaml", "name: first\n" + yaml.safe_dump(
        tiny_recipe(w["tiny"], MODEL), sort_keys=False))], 2, ["dup.yaml", "name: key given twice (lines 1 and 2)"]),
    # ---- runs / compare / promote / rollback: the store
    ("runs-missing-params", lambda w: ["runs", "-p", str(w["proj"] / "gone.yaml")], 2, ["gone.yaml"]),
    ("runs-n-zero", lambda w: ["runs", "-p", P, "-n", "0"], 2, ["-n", "0 is out of range (allowed: 1 or more)"]),
    ("runs-n-not-a-number", lambda w: ["runs", "-p", P, "-n", "ten"], 2, ["'ten'"]),
    ("compare-unknown-run", lambda w: ["compare", "ffffffff", "-p", P], 2, ["ffffffff"]),
    ("compare-not-an-id", lambda w: ["compare", "run#1", "-p", P], 2, ["run#1", "not a run id"]),
    ("promote-unknown-version", lambda w: ["promote", "99", "--reason", "x", "-p", P], 2,
     ["no version '99'", "its versions:"]),
    ("promote-without-reason", lambda w: ["promote", "1", "-p", P], 2, ["--reason"]),
    ("promote-unknown-model", lambda w: ["promote", "1", "--reason", "x", "-p", P, "--tracking-uri",
                                         f"sqlite:///{w['lone'] / 'other.db'}"], 2, [MODEL]),
    ("rollback-no-history", lambda w: ["rollback", "--reason", "x", "-p", P], 2, ["no earlier champion", MODEL]),
    ("rollback-no-champion", lambda w: ["rollback", "--reason", "x", "-p", P, "--tracking-uri",
                                        f"sqlite:///{w['lone'] / 'other.db'}"], 2, ["no champion", MODEL]),
    ("runs-unreachable-server", lambda w: ["runs", "-p", P, "--tracking-uri", "http://127.0.0.1:9"],
     4, ["127.0.0.1:9"]),
    # ---- export
    ("export-missing-model", lambda w: ["export", str(w["lone"] / "nomodel"), "--format", "gguf", "--out",
                                        str(w["lone"] / "x.gguf")], 2, ["nomodel", "does not exist"]),
    ("export-unknown-format", lambda w: ["export", str(w["tiny"]), "--format", "onnx", "--out",
                                         str(w["lone"] / "x.onnx")], 2, ["onnx"]),
    ("export-dense-to-compressed-tensors", lambda w: ["export", str(w["tiny"]), "--format", "compressed-tensors",
                                                      "--out", str(w["lone"] / "ct")], 2, ["no quantized layer"]),
    ("export-corrupt-weights", lambda w: ["export", str(w["lone"] / "corrupt-model"), "--format", "gguf", "--out",
                                          str(w["lone"] / "c.gguf")], 3, ["model.safetensors", "truncated"]),
    # ---- team (arguments that fail before any service starts)
    ("team-unknown-action", lambda w: ["team", "restart"], 2, ["restart", "invalid choice"]),
    ("team-port-without-number", lambda w: ["team", "up", "--port", "mlflow", "--project", str(w["lone"]),
                                            "--home", str(w["lone"] / "new-team")], 2, ["--port", "mlflow"]),
    ("team-port-not-a-number", lambda w: ["team", "up", "--port", "mlflow=high", "--project", str(w["lone"]),
                                          "--home", str(w["lone"] / "new-team")], 2, ["--port", "mlflow=high"]),
    ("team-not-a-checkout", lambda w: ["team", "up", "--project", str(w["lone"]), "--home",
                                       str(w["lone"] / "new-team")], 2, ["not a frugalflow checkout"]),
    # ---- ui
    ("ui-port-not-a-number", lambda w: ["ui", "-p", P, "--port", "http"], 2, ["'http'"]),
    ("ui-port-out-of-range", lambda w: ["ui", "-p", P, "--port", "99999"], 2,
     ["--port", "99999 is out of range (allowed: 1 to 65535)"]),
    ("ui-port-in-use", lambda w: ["ui", "-p", P, "--port", w["busy_port"]], 2,
     ["cannot listen on 127.0.0.1:", "in use", "pick a free port"]),
    ("ui-missing-params", lambda w: ["ui", "-p", str(w["proj"] / "nope.yaml")], 2, ["nope.yaml"]),
]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse and the recipe check exit this way
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_records_nothing(case, world, capsys, monkeypatch):
    name, argv_of, expected_code, needles = case
    monkeypatch.chdir(world["lone"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    argv = [a.replace(P, str(world["proj"] / "params.yaml")) for a in argv_of(world)]
    before = snapshot(world["proj"])
    outputs = [Path(a) for a in argv if a.endswith((".gguf", "/ct", "new-team"))]
    code, message = run_cli(argv, capsys)
    assert code == expected_code, f"{name}: exit {code}, expected {expected_code}:\n{message}"
    for needle in needles:
        assert needle in message, f"{name}: {needle!r} not named in:\n{message}"
    assert "Traceback" not in message
    assert snapshot(world["proj"]) == before, f"{name} recorded something"
    assert not (world["proj"] / "artifacts").exists() and not (world["proj"] / "data").exists()
    assert not any(p.exists() for p in outputs)


def test_there_are_at_least_40_cases_over_every_command(world):
    assert len(CASES) >= 40
    commands = {argv_of(world)[0] for _, argv_of, _, _ in CASES}
    assert commands >= {"run", "validate", "sweep", "schedule", "runs", "compare", "promote", "rollback",
                        "export", "ui", "team"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA, so device: cuda is valid here")
def test_cuda_without_a_device_is_refused_by_validate(world, capsys):
    recipe = lone_file(world, "cuda.yaml", {**lone_recipe(world), "device": "cuda"})
    code, message = run_cli(["validate", recipe], capsys)
    assert code == 2 and "device" in message and "no CUDA device" in message


def test_validate_refuses_what_run_refuses_as_subprocesses(world):
    """The real console entry, as a user types it: validate and run agree on a DVC-owned override."""
    params = str(world["proj"] / "params.yaml")
    before = snapshot(world["proj"])
    for command in (["validate", params], ["run", "-p", params]):
        done = subprocess.run([sys.executable, "-m", "flows.cli", *command, "-s", "data.window=256"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 2 and "data.window=256" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "flows.cli", "export", str(world["lone"] / "corrupt-model"),
                           "--format", "gguf", "--out", str(world["lone"] / "s.gguf")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 3 and "truncated" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(world["proj"]) == before


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    for line in ("2  bad input", "3  corrupt or inconsistent data", "4  a service", "1  anything else"):
        assert line in shown
