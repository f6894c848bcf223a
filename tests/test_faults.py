"""Faults injected into a real stage task (Prefect task, sqlite MLflow store, tiny model): a full
disk while the stage saves its output and while it logs to MLflow, and the tracking store locked
mid-stage. Each ends in a clear error (exit code 4 through the CLI's mapping), leaves nothing
half-written that a later run would reuse, and the next run succeeds.

The full disk is a file-size limit (RLIMIT_FSIZE) set in the test process for the duration of the
faulty step only and restored after it; writes past it fail with EFBIG as on a full disk (Python
ignores SIGXFSZ)."""
from __future__ import annotations

import contextlib
import errno
import resource
import sqlite3
from pathlib import Path

import pytest

from frugalflow.config import MagnitudePrune
from frugalflow.integrity import verify_manifest
from tasks.services import exit_code_for


@contextlib.contextmanager
def file_size_limit(limit: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture
def store(tmp_path, prefect_harness):
    from tasks import tracking as T

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = T.connect(uri)
    exp = T.experiment_id(client, "faults", tmp_path / "mlartifacts")
    return tmp_path, T.Tracking(uri=uri, experiment_id=exp, parent_run_id=T.start_run(client, exp, "parent"))


def stage(store, tiny_model_dir, sparsity: float = 0.5) -> dict:
    from tasks.compress import compress_stage

    root, tracking = store
    return compress_stage(MagnitudePrune(method="magnitude", sparsity=sparsity), 0, str(tiny_model_dir), "base",
                          data_dir=str(root / "data"), data_key="data", teacher_dir=str(tiny_model_dir),
                          artifacts_dir=str(root / "artifacts"), device="cpu", seed=0, pruned=False, tracking=tracking)


def entries(root: Path) -> list[str]:
    folder = root / "artifacts" / "stages"
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.is_dir() else []


def failure(exc: BaseException) -> tuple[int, str]:
    known = exit_code_for(exc)
    assert known is not None, f"a fault became a bug: {exc!r}"
    return known


def test_full_disk_while_a_stage_saves(store, tiny_model_dir, monkeypatch):
    import tasks.compress as C

    real = C.run_stage

    def run_stage_on_a_full_disk(*args, **kwargs):
        with file_size_limit(100_000):  # the tiny model's weights are ~400 KB
            return real(*args, **kwargs)

    monkeypatch.setattr(C, "run_stage", run_stage_on_a_full_disk)
    with pytest.raises(Exception) as caught:  # safetensors' native writer: SafetensorError (os error 27)
        stage(store, tiny_model_dir)
    code, message = failure(caught.value)
    assert code == 4 and "disk refused a write" in message and f"os error {errno.EFBIG}" in message, message
    root, _ = store
    assert entries(root) == []  # no entry, no temporary folder: nothing half-written to reuse
    monkeypatch.setattr(C, "run_stage", real)
    again = stage(store, tiny_model_dir)  # space again: the next run succeeds
    assert not again["cached"]
    verify_manifest(again["dir"])


def test_full_disk_while_logging_to_mlflow(store, tiny_model_dir, monkeypatch):
    import tasks.compress as C

    real = C.seal_dir
    limited = []

    def seal_then_fill_the_disk(tmp, folder):
        out = real(tmp, folder)  # the entry is complete; from here on every file that grows fails
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        limited.append((soft, hard))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
        return out

    monkeypatch.setattr(C, "seal_dir", seal_then_fill_the_disk)
    try:
        with pytest.raises(Exception) as caught:
            stage(store, tiny_model_dir)
    finally:
        if limited:
            resource.setrlimit(resource.RLIMIT_FSIZE, limited[0])
    code, message = failure(caught.value)
    assert code == 4, message
    monkeypatch.setattr(C, "seal_dir", real)
    root, _ = store
    [entry] = entries(root)
    verify_manifest(root / "artifacts" / "stages" / entry)  # sealed before the fault: complete and checked
    again = stage(store, tiny_model_dir)
    assert again["cached"]  # reused after its checksums were verified, not recomputed


def test_tracking_store_locked_mid_stage(store, tiny_model_dir, monkeypatch):
    import tasks.compress as C

    root, _ = store
    real = C.run_stage
    real_close = C.close_failed
    holder = sqlite3.connect(root / "mlflow.db", timeout=1)

    def run_stage_then_lock_the_store(*args, **kwargs):
        out = real(*args, **kwargs)
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the store: nobody else can write
        return out

    def free_the_store_then_close(*args, **kwargs):
        holder.rollback()  # the stage has given up: the other process lets go, the run can be closed
        return real_close(*args, **kwargs)

    monkeypatch.setattr(C, "run_stage", run_stage_then_lock_the_store)
    monkeypatch.setattr(C, "close_failed", free_the_store_then_close)
    try:
        with pytest.raises(Exception) as caught:
            stage(store, tiny_model_dir)
    finally:
        holder.rollback()
        holder.close()
    code, message = failure(caught.value)
    assert code == 4 and "locked" in message, message
    from mlflow import MlflowClient

    client = MlflowClient(store[1].uri)
    [stage_run] = client.search_runs([store[1].experiment_id], "tags.mlflow.parentRunId != ''")
    assert stage_run.info.status == "FAILED", stage_run.info  # closed once the store was free
    monkeypatch.setattr(C, "run_stage", real)
    again = stage(store, tiny_model_dir)  # the store is back: the sealed output is reused
    assert again["cached"]


def test_cli_reports_a_locked_store_as_a_service_failure(tmp_path, capsys):
    from flows.cli import main
    from tasks import tracking as T

    (tmp_path / "params.yaml").write_text("name: locked\nstages: [{method: rtn}]\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    T.connect(uri)
    holder = sqlite3.connect(tmp_path / "mlflow.db", timeout=1)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        code = main(["runs", "-p", str(tmp_path / "params.yaml"), "--tracking-uri", uri])
    finally:
        holder.rollback()
        holder.close()
    err = capsys.readouterr().err
    assert code == 4 and "mlflow.db" in err and "locked" in err, err
    assert main(["runs", "-p", str(tmp_path / "params.yaml"), "--tracking-uri", uri]) == 0
