"""Prefect task: bring the DVC-versioned inputs up to date and describe their lineage.

`dvc repro` (through DVC's Python API) reruns only the stages whose params or deps
changed; the lineage recorded on every run is the git commit plus the dvc.lock hash of
each stage output.
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


def reproduce(root: Path, push: bool = False) -> list[str]:
    """`dvc repro` in `root`; returns the names of the stages that ran."""
    from dvc.repo import Repo

    # Stage commands say `python`: make that the interpreter running this flow.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)  # "git add dvc.lock" hints
    # DVC resolves stage paths against the working directory: run it from the project root.
    with contextlib.chdir(root), Repo(str(root)) as repo:
        ran = repo.reproduce()
        if push:
            repo.push()
    return [getattr(s, "addressing", str(s)) for s in ran]


@task(name="update-data")
def update_data(root: str, push: bool = False) -> dict:
    logger = get_run_logger()
    root_path = Path(root)
    if not (root_path / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{root_path / 'dvc.yaml'} is missing: frugalflow runs from a project with dvc.yaml")
    logger.info("dvc repro in %s", root_path)
    ran = reproduce(root_path, push=push)
    logger.info("dvc stages run: %s", ", ".join(ran) if ran else "none (inputs unchanged, cached)")
    return {**git_commit(root_path), "dvc": dvc_lock_hashes(root_path), "dvc_stages_run": ran}
