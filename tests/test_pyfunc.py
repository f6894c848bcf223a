"""`tasks.pyfunc`: a tiny dense and a tiny packed-quantized model directory logged as pyfunc
models in a temporary sqlite store, registered, loaded back through `models:/NAME@champion`,
and served by a real `mlflow models serve --env-manager local` on 127.0.0.1."""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import free_port, post
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from frugalflow.arch import compressible_linears
from frugalflow.models import QUANT_META, load_model, load_tokenizer, save_model
from frugalflow.quant.pack import quantize_model
from frugalflow.quant.rtn import compute_qparams, quantize
from tasks.pyfunc import LOCK, REQUIREMENTS, _tracking_uri, log_pyfunc, pinned_requirements, register_pyfunc
from tasks.pyfunc_model import DEFAULT_NEW_TOKENS, TextGenerator, as_requests

NAME = "tiny-pyfunc"
PROMPTS = ["def f(x):", "The class statement"]
ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}  # nothing but 127.0.0.1 is contacted


@functools.lru_cache(maxsize=4)
def loaded(model_dir: Path):
    return load_model(model_dir), load_tokenizer(model_dir)


def reference(model_dir: Path, prompt: str, new_tokens: int) -> str:
    """Greedy continuation straight from the library, without MLflow."""
    model, tok = loaded(Path(model_dir))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory) -> Path:
    model = load_model(tiny_model_dir)
    qparams = {}
    for name, m in compressible_linears(model).items():
        scale, zero = compute_qparams(m.weight.data, 4, 32, False)
        qparams[name] = (quantize(m.weight.data, scale, zero, 4, 32), scale, zero)
    return save_model(quantize_model(model, qparams, 4, 32, symmetric=False),
                      tmp_path_factory.mktemp("q") / "q4", tokenizer_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def store(tiny_model_dir, quantized_dir, tmp_path_factory):
    """Version 1: the dense model; version 2: the packed 4-bit one, alias champion."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("pyfunc", artifact_location=(root / "mlartifacts").as_uri())
    logged = []
    for model_dir in (tiny_model_dir, quantized_dir):
        run_id = client.create_run(experiment, tags={"frugalflow.recipe": "tiny"}).info.run_id
        client.log_param(run_id, "stages.0.method", "rtn")
        client.log_metric(run_id, "candidate.ppl", 12.5)
        start = time.perf_counter()
        info = log_pyfunc(client, run_id, model_dir)
        version = register_pyfunc(client, NAME, info["model_uri"], run_id, tags={"verdict": "pass"})
        logged.append({**info, "run_id": run_id, "version": version, "dir": model_dir,
                       "seconds": time.perf_counter() - start})
        client.set_terminated(run_id, "FINISHED")
    client.set_registered_model_alias(NAME, "champion", logged[1]["version"])
    return {"uri": uri, "client": client, "experiment": experiment, "dense": logged[0], "quantized": logged[1]}


# --------------------------------------------------------------------------- input handling
def test_requests_from_frames_lists_and_strings():
    frame = pd.DataFrame({"prompt": ["a", "b", "c"], "max_new_tokens": [3, np.nan, 7]})
    assert as_requests(frame, 5) == [("a", 3), ("b", 5), ("c", 7)]
    assert as_requests(pd.DataFrame({"prompt": ["a"]}), 5) == [("a", 5)]
    assert as_requests(["a", "b"], 4) == [("a", 4), ("b", 4)]
    assert as_requests(np.array(["a", "b"]), 4) == [("a", 4), ("b", 4)]
    assert as_requests(pd.Series(["a"]), 4) == [("a", 4)]
    assert as_requests("solo", 2) == [("solo", 2)]
    assert as_requests({"prompt": "x", "max_new_tokens": 9}, 2) == [("x", 9)]
    with pytest.raises(ValueError, match="'prompt' column.*'text'"):
        as_requests(pd.DataFrame({"text": ["a"]}), 4)
    with pytest.raises(ValueError, match="must be strings, got int"):
        as_requests([1, 2], 4)
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 512\], got 0"):
        as_requests(pd.DataFrame({"prompt": ["a"], "max_new_tokens": [0]}), 4)


def test_requirements_are_pinned_from_the_lock():
    pins = dict(line.split("==") for line in pinned_requirements())
    assert list(pins) == list(REQUIREMENTS)
    lock = dict(line.split("==") for line in LOCK.read_text().splitlines() if "==" in line)
    assert pins["mlflow"] == lock["mlflow"] == mlflow.__version__
    assert pins["torch"] == lock["torch"] and pins["transformers"] == lock["transformers"]


def test_chat_param_wraps_prompts_in_the_chat_template(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = load_tokenizer(model_dir)
    tok.chat_template = ("{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    tok.save_pretrained(model_dir)
    generator = TextGenerator()
    generator.load_context(types.SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
    templated = "user: The class statement\nassistant:"
    assert generator.predict(None, ["The class statement"], {"max_new_tokens": 4, "chat": True}) == [
        reference(model_dir, templated, 4)]
    assert generator.predict(None, ["The class statement"], {"max_new_tokens": 4}) == [
        reference(model_dir, "The class statement", 4)]
    assert reference(model_dir, templated, 4) != reference(model_dir, "The class statement", 4)


# --------------------------------------------------------------------------- logging and registry
def test_logged_models_are_linked_to_run_and_versions(store):
    client = store["client"]
    for key, number in (("dense", "1"), ("quantized", "2")):
        logged = store[key]
        model = client.get_logged_model(logged["model_id"])
        assert model.source_run_id == logged["run_id"] and model.experiment_id == store["experiment"]
        assert model.status == LoggedModelStatus.READY and model.params["stages.0.method"] == "rtn"
        assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": number}]
        run = client.get_run(logged["run_id"])
        assert [o.model_id for o in run.outputs.model_outputs] == [logged["model_id"]]
        version = client.get_model_version(NAME, number)
        assert logged["version"] == number and version.source == logged["model_uri"]
        assert version.run_id == logged["run_id"] and version.tags["verdict"] == "pass"
    assert client.get_model_version_by_alias(NAME, "champion").version == 2
    # what the model carries: the directory, the frugalflow code, pinned requirements
    local = Path(mlflow.artifacts.download_artifacts(store["quantized"]["artifact_uri"],
                                                     tracking_uri=store["uri"]))
    assert (local / "artifacts" / "q4" / QUANT_META).is_file()
    assert (local / "code" / "frugalflow" / "models.py").is_file()
    requirements = (local / "requirements.txt").read_text().split()
    assert set(requirements) == set(pinned_requirements())


def test_champion_loads_and_generates_like_the_library(store, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading prepends the model's code/ to sys.path
    with _tracking_uri(store["uri"]):
        champion = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        dense = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    qdir, ddir = store["quantized"]["dir"], store["dense"]["dir"]
    out = champion.predict(pd.DataFrame({"prompt": PROMPTS, "max_new_tokens": [3, 6]}))
    assert out == [reference(qdir, PROMPTS[0], 3), reference(qdir, PROMPTS[1], 6)]
    assert all(isinstance(s, str) and s for s in out)
    assert champion.predict(PROMPTS, params={"max_new_tokens": 4}) == [reference(qdir, p, 4) for p in PROMPTS]
    assert champion.predict(PROMPTS[:1]) == [reference(qdir, PROMPTS[0], DEFAULT_NEW_TOKENS)]
    assert dense.predict(PROMPTS[:1], params={"max_new_tokens": 5}) == [reference(ddir, PROMPTS[0], 5)]
    with pytest.raises(Exception, match="must be strings"):
        champion.predict([1, 2])


@pytest.mark.slow
def test_model_needs_neither_tasks_nor_flows(store, tmp_path):
    """The model is logged as code (tasks/pyfunc_model.py) and frugalflow comes from the model's code/."""
    local = mlflow.artifacts.download_artifacts(store["quantized"]["artifact_uri"], tracking_uri=store["uri"],
                                                dst_path=str(tmp_path))
    script = (
        "import sys, json\n"
        "sys.modules['tasks'] = None; sys.modules['flows'] = None  # importing them now fails\n"
        "import mlflow\n"
        f"model = mlflow.pyfunc.load_model({local!r})\n"
        "import frugalflow\n"
        "print(json.dumps({'out': model.predict(['def f(x):'], params={'max_new_tokens': 3}),"
        " 'frugalflow': frugalflow.__file__}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, **ENV}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["out"] == [reference(store["quantized"]["dir"], "def f(x):", 3)]
    assert Path(result["frugalflow"]).is_relative_to(Path(local) / "code")
    mlmodel = yaml.safe_load((Path(local) / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"].get("model_code_path")  # models-from-code, no pickle
    assert "saved_input_example_info" in mlmodel and mlmodel["signature"]["params"]


# --------------------------------------------------------------------------- serving
@pytest.mark.slow
def test_mlflow_models_serve_answers(store, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` execs `uvicorn` from PATH
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": store["uri"],
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own group: uvicorn is killed with it
    try:
        deadline = start + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                pytest.fail(f"no answer on {base}/ping within 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"server ready after {time.perf_counter() - start:.1f} s")
        qdir = store["quantized"]["dir"]

        status, body = post(f"{base}/invocations", {
            "dataframe_split": {"columns": ["prompt", "max_new_tokens"],
                                "data": [[PROMPTS[0], 3], [PROMPTS[1], 5]]}})
        assert status == 200, body
        assert body == {"predictions": [reference(qdir, PROMPTS[0], 3), reference(qdir, PROMPTS[1], 5)]}

        status, body = post(f"{base}/invocations", {"inputs": PROMPTS, "params": {"max_new_tokens": 4}})
        assert status == 200, body
        assert body["predictions"] == [reference(qdir, p, 4) for p in PROMPTS]

        status, body = post(f"{base}/invocations", {"inputs": [1, 2]})
        assert status == 400 and "must be strings" in body["message"] + body.get("stack_trace", "")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_tracking_uri_switch_leaves_no_trace(monkeypatch, tmp_path):
    """mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI; after the switch neither the URI nor
    the variable may linger (a later run in the process would resolve its store from it)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with _tracking_uri(f"sqlite:///{tmp_path / 'a.db'}"):
        assert mlflow.get_tracking_uri().endswith("a.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ and not mlflow.is_tracking_uri_set()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with _tracking_uri(f"sqlite:///{tmp_path / 'b.db'}"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert not mlflow.is_tracking_uri_set()  # the variable's value was not pinned in MLflow's global
