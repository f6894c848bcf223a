"""A frugalflow model directory as an MLflow pyfunc text generator, servable with
`mlflow models serve -m models:/NAME@champion --env-manager local`.

`log_pyfunc` logs it as an MLflow 3 LoggedModel of a given run (artifact `model_dir` = the
dense or packed-quantized directory, code path = the `frugalflow` package) and returns its
`models:/<model_id>` URI; `register_pyfunc` makes a registry version of that URI. The model
is logged as code (tasks/pyfunc_model.py, with a signature and an input example), so loading
it needs MLflow, torch, transformers and the bundled `frugalflow`, not this repository's
`tasks` or `flows`.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import Model, ModelSignature
from mlflow.types import DataType, ParamSchema, ParamSpec

VERSIONS_TAG = "mlflow.modelVersions"  # where MLflow lists a logged model's registry versions
# what loading and running a model directory imports; versions pinned from requirements.lock
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas",
                "pydantic", "PyYAML")
MODEL_CODE = Path(__file__).resolve().with_name("pyfunc_model.py")  # models-from-code: run when loaded
LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"

# Params only: a column schema would make MLflow turn a plain list of prompts into a DataFrame
# with a column `0` and refuse it; `as_requests` checks the input instead.
SIGNATURE = ModelSignature(inputs=None, params=ParamSchema([
    ParamSpec("max_new_tokens", DataType.long, 32),  # = pyfunc_model.DEFAULT_NEW_TOKENS (not imported: it runs set_model)
    ParamSpec("chat", DataType.boolean, False),
]))


def pinned_requirements(lock: Path = LOCK) -> list[str]:
    """`name==version` for REQUIREMENTS: from requirements.lock, else the installed versions."""
    from importlib.metadata import version

    pins = {}
    if lock.is_file():
        for line in lock.read_text().splitlines():
            name, sep, ver = line.split("#")[0].strip().partition("==")
            if sep:
                pins[name.lower().replace("_", "-")] = ver
    return [f"{n}=={pins.get(n.lower()) or version(n).split('+')[0]}" for n in REQUIREMENTS]


def log_pyfunc(client: MlflowClient, run_id: str, model_dir: str | Path, name: str = "pyfunc",
               tags: dict | None = None) -> dict:
    """Log `model_dir` as a pyfunc LoggedModel of run `run_id`, in the run's experiment.

    Returns {"model_id", "model_uri" ("models:/<model_id>", what to register), "artifact_uri"}.
    MLflow 3 keeps a logged model's files under the experiment's `models/<model_id>/artifacts`,
    not under the run's artifacts; the run lists it among its outputs."""
    import frugalflow

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                        params=dict(run.data.params),
                                        tags={k: str(v) for k, v in (tags or {}).items()})
    code = str(Path(frugalflow.__file__).parent)
    example = (pd.DataFrame({"prompt": ["def add(a, b):"]}), {"max_new_tokens": 1})
    with _tracking_uri(client.tracking_uri):
        # Model.log (what mlflow.pyfunc.log_model calls) takes run_id and model_id; its client
        # and the LoggedModel's finalization use the fluent tracking URI
        info = Model.log(artifact_path=None, flavor=mlflow.pyfunc, name=name, run_id=run_id,
                         model_id=logged.model_id, python_model=str(MODEL_CODE),
                         artifacts={"model_dir": str(model_dir)}, code_paths=[code],
                         signature=SIGNATURE, input_example=example, pip_requirements=pinned_requirements())
    return {"model_id": info.model_id, "model_uri": f"models:/{info.model_id}",
            "artifact_uri": info.artifact_path}


def create_version(client: MlflowClient, name: str, source: str, run_id: str | None = None,
                   tags: dict | None = None):
    """`client.create_model_version` that also takes a logged model's `models:/<model_id>` URI
    against this client's store (the sqlite registry resolves such a source through the global
    tracking URI) and, like `mlflow.register_model`, lists the version on the logged model
    (tag `mlflow.modelVersions`). Other sources are registered as they are."""
    model_id = _logged_model_id(source)
    tags = {k: str(v)[:5000] for k, v in (tags or {}).items()}
    with _tracking_uri(client.tracking_uri):
        version = client.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=model_id)
    if model_id:
        listed = json.loads(client.get_logged_model(model_id).tags.get(VERSIONS_TAG, "[]"))
        listed.append({"name": version.name, "version": str(version.version)})
        client.set_logged_model_tags(model_id, {VERSIONS_TAG: json.dumps(listed)})
    from frugalflow.pausepoints import pause_point

    pause_point("register")  # tests/test_kill.py: a version exists, no alias points at it yet
    return version


def register_pyfunc(client: MlflowClient, name: str, model_uri: str, run_id: str | None = None,
                    tags: dict | None = None) -> str:
    """A new version of registered model `name` (created if missing) for `model_uri`; its number."""
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="Compressed models produced by frugalflow")
    return str(create_version(client, name, model_uri, run_id, tags).version)


def _logged_model_id(uri: str) -> str | None:
    """`m-...` for `models:/m-...`; None for a registry URI (models:/NAME/1, models:/NAME@alias) or a path."""
    rest = uri.removeprefix("models:/") if uri.startswith("models:/") else ""
    return rest if rest.startswith("m-") and "/" not in rest and "@" not in rest else None


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """Point MLflow's fluent API (which Model.log uses) at `uri` for the duration, with the
    public `mlflow.set_tracking_uri`; after, the previous state comes back exactly: the URI
    (or none set) and MLFLOW_TRACKING_URI, which set_tracking_uri also writes."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    # a URI set with set_tracking_uri, not one only read from the variable: restoring the variable's
    # value through set_tracking_uri would pin it in MLflow's global, which MLflow's own temporary
    # switches later write back into the variable, after the variable itself is gone
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() and env is None else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
