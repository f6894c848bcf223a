"""Prefect task: bring the DVC-versioned inputs up to date and describe their lineage.

`dvc repro` (through DVC's Python API) reruns only the stages whose params or deps
changed; the lineage recorded on every run is the git commit plus the dvc.lock hash of
each stage output.

Shared data (team mode): when an S3 remote is configured (`FRUGALFLOW_DVC_REMOTE`: a remote
name from the DVC config or an s3:// URL; else DVC's default remote when it is on S3), outputs
missing here but recorded in dvc.lock are pulled from it instead of recomputed, and after the
repro the base model and data are pushed to it. The endpoint and credentials come from the
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or DVC's --local
config, never from a committed file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import get_run_logger, task


def git_commit(root: Path) -> dict:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    sha = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": sha, "git_dirty": dirty}


def dvc_lock_hashes(root: Path) -> dict[str, str]:
    """Output path -> md5 for every stage output recorded in dvc.lock."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    hashes = {}
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            hashes[out["path"]] = out.get("md5", "")
    return hashes


REMOTE_ENV = "FRUGALFLOW_DVC_REMOTE"
ENV_REMOTE = "frugalflow-env"  # the name a remote given as a URL gets


def shared_remote(root: Path) -> tuple[str, dict | None, str] | None:
    """The S3 remote this project shares its DVC data through: (name, config to add or None, url);
    None when there is none (the embedded default keeps its local remote and pushes nothing)."""
    from dvc.config import Config

    value = os.environ.get(REMOTE_ENV, "").strip()
    if value and "://" in value:
        if not value.startswith("s3://"):
            raise ValueError(f"{REMOTE_ENV}={value!r}: give an s3://BUCKET[/PREFIX] URL or the name of a DVC remote")
        return ENV_REMOTE, {"url": value}, value
    remotes = Config(str(root / ".dvc"))
    name = value or remotes["core"].get("remote")
    if not name:
        return None
    if name not in remotes["remote"]:
        if value:
            raise ValueError(f"{REMOTE_ENV}={value!r}: no DVC remote of that name in {root / '.dvc' / 'config'} "
                             f"(remotes: {', '.join(remotes['remote']) or 'none'}); add it with `dvc remote add`")
        return None
    url = str(remotes["remote"][name].get("url", ""))
    if not url.startswith("s3://"):
        if value:
            raise ValueError(f"{REMOTE_ENV}={value!r}: DVC remote {name!r} is at {url!r}, not on S3")
        return None
    return name, None, url


REPRO_LOCK_S = 3600  # a `dvc repro` + push of SmolLM2 and its data fits with room to spare


def reproduce(root: Path, push: bool = False, remote: tuple[str, dict | None, str] | None = None) -> list[str]:
    """`dvc repro` in `root`, pulling missing outputs from `remote` (see `shared_remote`) and
    pushing to it afterwards when given; returns the names of the stages that ran."""
    from dvc.repo import Repo

    # Stage commands say `python`: make that the interpreter running this flow.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)  # "git add dvc.lock" hints
    # DVC resolves stage paths against the working directory: run it from the project root.
    name, extra, _ = remote or (None, None, None)
    with checkout_lock(root), contextlib.chdir(root), Repo(str(root), remote=name, remote_config=extra) as repo:
        ran = repo.reproduce(pull=remote is not None)
        if push or remote is not None:
            repo.push(remote=name)
    return [getattr(s, "addressing", str(s)) for s in ran]


@contextlib.contextmanager
def checkout_lock(root: Path, timeout: float = REPRO_LOCK_S):
    """One `dvc repro` + push at a time per checkout: a second run in the same folder (a manual run
    during the nightly one) waits for the first instead of failing on DVC's own lock, which DVC gives
    up on after a few seconds."""
    from filelock import FileLock, Timeout

    from frugalflow.errors import ServiceUnavailable

    path = root / ".dvc" / "tmp" / "frugalflow-repro.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logging.getLogger(__name__).warning("another run is reproducing the DVC data in %s; waiting up to %d s "
                                            "(%s)", root, timeout, path)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise ServiceUnavailable(f"another run has held the DVC lock of {root} ({path}) for more than "
                                     f"{timeout:.0f} s; see which run with `frugalflow runs` and wait or "
                                     "stop it") from None
    try:
        yield
    finally:
        lock.release()


@task(name="update-data")
def update_data(root: str, push: bool = False) -> dict:
    logger = get_run_logger()
    root_path = Path(root)
    if not (root_path / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{root_path / 'dvc.yaml'} is missing: frugalflow runs from a project with dvc.yaml")
    remote = shared_remote(root_path)
    logger.info("dvc repro in %s%s", root_path, f"; shared remote {remote[2]}" if remote else "")
    ran = reproduce(root_path, push=push, remote=remote)
    logger.info("dvc stages run: %s", ", ".join(ran) if ran else "none (inputs unchanged, cached or pulled)")
    if remote:
        logger.info("dvc push: base model and data are in %s", remote[2])
    return {**git_commit(root_path), "dvc": dvc_lock_hashes(root_path), "dvc_stages_run": ran,
            "dvc_remote": remote[2] if remote else None}
