"""Helpers shared by the flow tests (end-to-end, schedule, UI): a tiny frugalflow project on
disk (git + DVC, the real dvc.yaml, a local tiny Llama, pydoc windows, sqlite MLflow store),
running the real flow on it, and starting/stopping/waiting on server subprocesses."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(tiny_model_dir: Path, name: str, **sections) -> dict:
    """magnitude 0.5 -> rtn 4-bit (int8 head, as the default recipe) -> 3 KL steps on windows of 64 tokens;
    registered model `name`.
    Each keyword replaces a section (dict sections are updated key by key)."""
    recipe = {
        "name": name,
        "base_model": {"source": "local", "local_dir": str(tiny_model_dir), "path": "models/base"},
        "data": {"corpus": "pydoc_topics", "window": 64, "calib_windows": 8, "train_windows": 16,
                 "eval_windows": 6, "path": "data"},
        "stages": [
            {"method": "magnitude", "sparsity": 0.5},
            {"method": "rtn", "bits": 4, "group_size": 32, "head_bits": 8},
            {"method": "kl", "steps": 3, "batch_size": 2, "seq_len": 32, "lr": 1e-4},
        ],
        "evaluation": {"decode_tokens": 8, "decode_repeats": 1},
        "gates": {"max_ppl_increase_pct": 1000.0, "min_size_reduction": 2.0},
        "registry": {"model_name": name, "objective": "ppl"},
        "tracking": {"uri": "sqlite:///mlflow.db"},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and key in recipe else value
    return recipe


def stage_config(method: str, **kw):
    """One validated stage config, as the recipe loader builds it (e.g. stage_config("wanda", sparsity=0.5))."""
    from frugalflow import config as C

    return C.Recipe.model_validate({"stages": [{"method": method, **kw}]}).stages[0]


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


def make_project(proj: Path, recipe: dict) -> Path:
    """A git + DVC project in `proj` with the repo's dvc.yaml, its stages' code and `recipe` as
    params.yaml, committed."""
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    (proj / "frugalflow").mkdir()
    for name in ("fetch_model.py", "data.py"):  # the DVC stages' code deps
        shutil.copy(ROOT / "frugalflow" / name, proj / "frugalflow" / name)
    shutil.copytree(ROOT / "corpora", proj / "corpora")  # prepare_data's text deps
    (proj / "params.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (proj / ".gitignore").write_text("/models\n/data\n/artifacts\n/mlartifacts\nmlflow.db\n")
    git(proj, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=proj, check=True)
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "init")
    return proj


def run_flow(project: Path, overrides: list[str] | None = None, force: bool = False) -> dict:
    """The real compression_flow on the project (needs a Prefect API: the `prefect_harness` fixture);
    `force`: register even when a version has the same inputs (`frugalflow run --force`)."""
    from flows.nightly import compression_flow

    return compression_flow(params=str(project / "params.yaml"), overrides=overrides or [], force=force)


def store_uri(project: Path) -> str:
    return f"sqlite:///{project / 'mlflow.db'}"


def client_for(project: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store_uri(project), registry_uri=store_uri(project))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict, timeout: float = 60) -> tuple[int, dict]:
    """POST `payload` as JSON; (status, JSON body), an HTTP error's included."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def stop(proc: subprocess.Popen, first: int = signal.SIGINT, wait_s: float = 20) -> None:
    """Stop a process started here (own session): `first` to it, then SIGKILL to its group."""
    if proc.poll() is None:
        proc.send_signal(first)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children it left behind (uvicorn, flow-run processes)
    except ProcessLookupError:
        pass
    proc.wait(10)


@contextlib.contextmanager
def dask_cluster(scheduler_home: Path, worker_homes: list[Path], env: dict, procs: list | None = None):
    """A Dask scheduler and one single-threaded worker per folder in `worker_homes` (created empty),
    on loopback, with `env`; yields the scheduler address once every worker has joined. `procs`
    gets [scheduler, *workers] (to kill one); all are stopped at exit, workers first (SIGTERM, then
    SIGKILL to the group)."""
    from distributed import Client

    bin_dir, port = Path(sys.executable).parent, free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [] if procs is None else procs
    try:
        scheduler_home.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                       "--no-dashboard"], cwd=scheduler_home, env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=open(scheduler_home / "scheduler.log", "w")))
        for i, home in enumerate(worker_homes):
            home.mkdir(parents=True, exist_ok=True)
            procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nthreads", "1",
                                           "--nworkers", "1", "--no-nanny", "--no-dashboard", "--name", f"w{i}",
                                           "--local-directory", str(home)],
                                          cwd=home, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=open(home / "log", "w")))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(len(worker_homes), timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            stop(p, signal.SIGTERM)


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def wait_for(predicate, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, what: str, timeout: float) -> float:
    """Wait until GET `url` answers 200 and return the seconds it took; fail the test with the end
    of the server's `log` if the process exits or the time runs out."""
    import httpx
    import pytest

    started = time.monotonic()

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_for(healthy, timeout, 0.5):
        pytest.fail(f"{what} not answering within {timeout} s:\n{tail(log)}")
    return time.monotonic() - started
