"""A frugalflow model directory as an MLflow pyfunc text generator, servable with
`mlflow models serve -m models:/NAME@champion --env-manager local`.

`log_pyfunc` logs it as an MLflow 3 LoggedModel of a given run (artifact `model_dir` = the
dense or packed-quantized directory, code path = the `frugalflow` package) and returns its
`models:/<model_id>` URI; `register_pyfunc` makes a registry version of that URI. The
`TextGenerator` class is pickled by value, so loading the model needs MLflow, torch,
transformers and the bundled `frugalflow`, not this repository's `tasks` or `flows`.
"""
from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path

import cloudpickle
import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import Model, ModelSignature
from mlflow.types import DataType, ParamSchema, ParamSpec

DEFAULT_NEW_TOKENS = 32
VERSIONS_TAG = "mlflow.modelVersions"  # where MLflow lists a logged model's registry versions
MAX_NEW_TOKENS = 512  # a request can't hold a server worker for longer than this
# what loading and running a model directory imports; versions pinned from requirements.lock
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas",
                "pydantic", "PyYAML", "cloudpickle")
LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"

# Params only: a column schema would make MLflow turn a plain list of prompts into a DataFrame
# with a column `0` and refuse it; `as_requests` checks the input instead.
SIGNATURE = ModelSignature(inputs=None, params=ParamSchema([
    ParamSpec("max_new_tokens", DataType.long, DEFAULT_NEW_TOKENS),
    ParamSpec("chat", DataType.boolean, False),
]))


def _new_tokens(value, default: int) -> int:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return default
    n = int(value)
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {n}")
    return n


def as_requests(model_input, default_new_tokens: int) -> list[tuple[str, int]]:
    """(prompt, max_new_tokens) per row of a DataFrame with a `prompt` column (and an optional
    `max_new_tokens` column), or per string of a str / list / Series / 1-d array."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input if isinstance(model_input.get("prompt"), (list, tuple))
                                   else [model_input])
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ValueError(f"input needs a 'prompt' column, got columns {list(model_input.columns)}")
        counts = (model_input["max_new_tokens"] if "max_new_tokens" in model_input.columns
                  else [None] * len(model_input))
        prompts = list(model_input["prompt"])
    else:
        if isinstance(model_input, str):
            model_input = [model_input]
        prompts = list(np.asarray(model_input, dtype=object).reshape(-1))
        counts = [None] * len(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {', '.join(sorted(set(bad)))}")
    return [(p, _new_tokens(n, default_new_tokens)) for p, n in zip(prompts, counts)]


class TextGenerator(mlflow.pyfunc.PythonModel):
    """Greedy completion of each prompt with a frugalflow model directory (artifact `model_dir`)."""

    def load_context(self, context):
        import torch
        from frugalflow.models import load_model, load_tokenizer

        model_dir = context.artifacts["model_dir"]
        self.model = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_dir)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        """model_input: a DataFrame with `prompt` (and optional `max_new_tokens`) or a list/array of
        prompts (the hint only keeps MLflow from inferring a schema); params: max_new_tokens
        (default for rows without one), chat (wrap each prompt in the tokenizer's chat template)."""
        import torch
        from transformers import GenerationConfig

        params = params or {}
        chat = bool(params.get("chat", False)) and getattr(self.tokenizer, "chat_template", None) is not None
        requests = as_requests(model_input, _new_tokens(params.get("max_new_tokens"), DEFAULT_NEW_TOKENS))
        tok, device = self.tokenizer, next(self.model.parameters()).device
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.model.generation_config.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        pad = pad[0] if isinstance(pad, list) else pad
        outputs = []
        with torch.inference_mode():
            for prompt, new_tokens in requests:  # one prompt at a time: no padding, exact greedy output
                if chat:
                    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
                    enc = tok(text, return_tensors="pt", add_special_tokens=False)
                else:
                    enc = tok(prompt, return_tensors="pt")
                ids = enc["input_ids"].to(device)
                if ids.shape[1] == 0:
                    raise ValueError("a prompt encodes to zero tokens")
                config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                          eos_token_id=eos, pad_token_id=pad if pad is not None else 0)
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          generation_config=config)
                outputs.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return outputs


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
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        with _tracking_uri(client.tracking_uri), warnings.catch_warnings():
            # no input example on purpose: validating one would load and run the model once more
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            # Model.log (what mlflow.pyfunc.log_model calls) takes run_id and model_id; its client
            # and the LoggedModel's finalization use the fluent tracking URI
            info = Model.log(artifact_path=None, flavor=mlflow.pyfunc, name=name, run_id=run_id,
                             model_id=logged.model_id, python_model=TextGenerator(),
                             artifacts={"model_dir": str(model_dir)}, code_paths=[code],
                             signature=SIGNATURE, pip_requirements=pinned_requirements())
    finally:
        cloudpickle.unregister_pickle_by_value(module)
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
    """Point MLflow's fluent API (which Model.log uses) at `uri` for the duration (public
    `mlflow.set_tracking_uri`; the previous URI is restored after)."""
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
