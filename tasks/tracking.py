"""MLflow tracking helpers: explicit run ids through `MlflowClient` (no fluent global state,
so Prefect tasks in worker threads log to the right run)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

from frugalflow.redact import redact

MAX_PARAM = 6000


class Tracking(BaseModel):
    """Where a flow run records: passed to tasks instead of a client object."""

    model_config = ConfigDict(frozen=True)
    uri: str
    experiment_id: str
    parent_run_id: str


def resolve_uri(uri: str, root: Path) -> str:
    """The tracking URI to use: MLFLOW_TRACKING_URI when set (team mode), else the recipe's,
    with a relative sqlite or file store path taken relative to the project root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    for scheme in ("sqlite:///",):
        if uri.startswith(scheme) and not uri[len(scheme):].startswith("/"):
            return scheme + str((root / uri[len(scheme):]).resolve())
    if "://" not in uri:
        return str((root / uri).resolve())
    return uri


def _creating(uri: str):
    """For a SQLite store: a file lock (in the temporary folder, named after the database) while a client
    opens it, so that two runs starting together in one checkout do not both create (migrate) a new
    database at once."""
    from filelock import FileLock

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = Path(uri[len("sqlite:///"):]).resolve()
    name = hashlib.sha256(str(db).encode()).hexdigest()[:16]
    return FileLock(str(Path(tempfile.gettempdir()) / f"frugalflow-open-{name}.lock"), timeout=600)


QUICK_CHECK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def _quick_check(uri: str, quick: bool):
    """While `connect(quick=True)` checks a tracking server (before a run or a command does anything):
    one retry and a 10 s timeout, so that a server that is down is named at once. Every other request
    gets MLflow's own back-off (7 retries, about 4 minutes: a server or its database restarted mid-run
    is waited for), unless the environment sets its own."""
    chosen = {key: os.environ.get(key) for key in QUICK_CHECK} if quick and uri.startswith("http") else {}
    for key, value in chosen.items():
        if value is None:
            os.environ[key] = QUICK_CHECK[key]
    try:
        yield
    finally:
        for key, value in chosen.items():
            if value is None:
                os.environ.pop(key, None)


def connect(uri: str, *, quick: bool = False) -> MlflowClient:
    """A client whose store answers; a clear error naming the URI otherwise (at once with `quick`)."""
    if redact(uri) != uri:  # a password in the URL: MLflow would print it in its "View run" links
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    try:
        with _creating(uri), _quick_check(uri, quick):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as exc:  # the store's own exception types vary by backend
        raise ConnectionError(redact(f"cannot reach the MLflow tracking store at tracking.uri={uri!r}: "
                                     f"{type(exc).__name__}: {str(exc)[:300]}")) from None
    return client


def experiment_id(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The experiment's id, created if missing. A local store keeps artifacts under
    `artifact_root`; a tracking server chooses (and serves) its own artifact store."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    remote = client.tracking_uri.startswith(("http://", "https://", "databricks"))
    try:
        return client.create_experiment(name, artifact_location=None if remote else artifact_root.resolve().as_uri())
    except MlflowException as exc:  # two runs starting at once: the other one created it
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := client.get_experiment_by_name(name)) is None:
            raise
        return exp.experiment_id


def start_run(client: MlflowClient, experiment: str, name: str, parent_run_id: str | None = None,
              tags: dict | None = None) -> str:
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
    if all_tags.get("frugalflow.owner"):  # opened with runstate.process_tags: beat while it is open
        from tasks.runstate import HEARTBEAT

        HEARTBEAT.add(client.tracking_uri, run.info.run_id)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    items = [Param(k, str(v)[:MAX_PARAM]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int = 0) -> None:
    import time

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])


def set_tags(client: MlflowClient, run_id: str, tags: dict) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(text)
        parent = str(Path(artifact_file).parent)
        client.log_artifact(run_id, str(path), None if parent == "." else parent)


def log_dir(client: MlflowClient, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    """Every file under `local_dir` as artifacts of the run, under `artifact_path`."""
    client.log_artifacts(run_id, str(local_dir), artifact_path)


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    from tasks.runstate import HEARTBEAT

    HEARTBEAT.remove(run_id)
    client.set_terminated(run_id, status)


def log_json(client: MlflowClient, run_id: str, obj, artifact_file: str) -> None:
    log_text(client, run_id, json.dumps(obj, indent=2, default=str) + "\n", artifact_file)


SPLITS = {"calib": "calibration", "train": "training", "eval": "evaluation"}  # file stem -> mlflow.data.context


def source_tags(lineage: dict, name: str = "frugalflow") -> dict:
    """MLflow's standard source tags (the runs table's Source and Version columns)."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    return {MLFLOW_SOURCE_NAME: name, MLFLOW_SOURCE_TYPE: "LOCAL",
            MLFLOW_GIT_COMMIT: lineage.get("git_commit") or "unknown"}


def _file_md5(path: Path) -> str:
    """The md5 DVC records for a file inside a tracked folder (the file's content md5)."""
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_datasets(client: MlflowClient, run_id: str, data_dir: Path, data_key: str, stages=()) -> list[str]:
    """The prepared splits (calib/train/eval.safetensors) as MLflow dataset inputs of the run,
    each with context calibration/training/evaluation and the file's DVC md5 as digest; the
    source names the file, the DVC hash of the folder and, for calib, its sources (the corpus and
    each `data.calib_mix` entry with its windows). Each distillation stage that trains on text the
    teacher generates adds a `generated/<method>` training input (its prompts, sequences and
    tokens in the source). Returns the logged names."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    try:
        splits = json.loads((Path(data_dir) / "manifest.json").read_text()).get("splits", {})
    except (OSError, ValueError):
        splits = {}
    inputs = []
    for stem, context in SPLITS.items():
        path = Path(data_dir) / f"{stem}.safetensors"
        if not path.is_file():
            continue
        about = {"path": str(path), "dvc_dir_md5": data_key}
        if "sources" in splits.get(stem, {}):
            about["sources"] = {k: v["windows"] for k, v in splits[stem]["sources"].items()}
        dataset = Dataset(name=f"{Path(data_dir).name}/{stem}", digest=_file_md5(path), source_type="local",
                          source=json.dumps(about))
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    for stage in stages:
        if "generated" not in getattr(stage, "train_splits", ()):
            continue
        about = {"teacher": "base_model", "sequences": stage.generated_sequences, "tokens": stage.generated_tokens,
                 "prompts": list(stage.generated_prompts)}
        digest = hashlib.md5(json.dumps(about, sort_keys=True).encode()).hexdigest()
        dataset = Dataset(name=f"generated/{stage.method}", digest=digest, source_type="local",
                          source=json.dumps(about))
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")]))
    if inputs:
        _log_inputs_racing(client, run_id, inputs)
    return [d.dataset.name for d in inputs]


def _is_dataset_race(exc: Exception) -> bool:
    """The store's check-then-insert of a dataset lost to a concurrent run that inserted the same
    (experiment, name, digest) first: PostgreSQL's UniqueViolation on dataset_pk, SQLite's UNIQUE failure."""
    text = str(exc)
    return "datasets" in text and ("UniqueViolation" in text or "UNIQUE constraint failed" in text)


def _log_inputs_racing(client: MlflowClient, run_id: str, inputs: list, attempts: int = 3) -> None:
    """client.log_inputs, tried again when a concurrent run of the same experiment inserted the same
    dataset between the store's lookup and its insert (two nightly runs on one server); the next try
    finds that dataset and only links it to this run."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or not _is_dataset_race(exc):
                raise
