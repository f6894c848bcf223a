"""DVC data shared through S3, for real: a moto S3 server, real `dvc repro`/`push`/`pull`.

A first clone reproduces the tiny project (tests/helpers.py) and pushes the base model and data
to the S3 remote (tasks/lineage.py, the code the flow runs); a second clone with no DVC cache
pulls them through the same code instead of recomputing, and a third through the `dvc pull`
command: same dvc.lock hashes, same bytes, same baseline perplexity."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, git, make_project, tiny_recipe

from tasks import lineage as L

pytestmark = pytest.mark.slow  # real S3 server, real DVC stages


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def remote(team_stack):
    """The team's DVC bucket on the team's S3 server, and a client's environment for it."""
    bucket = team_stack.buckets["dvc"]
    env = {k: team_stack.client_env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    return {"url": f"s3://{bucket}/test-team-dvc", "bucket": bucket, "prefix": "test-team-dvc", "env": env}


@pytest.fixture
def s3_env(remote, monkeypatch):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", L.REMOTE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in remote["env"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return remote


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)


def baseline_ppl(root: Path) -> float:
    """The baseline perplexity the flow would record (the library's evaluation of models/base)."""
    from frugalflow.evaluate.suite import evaluate_model
    from frugalflow.recipe_io import load_recipe

    recipe = load_recipe(str(root / "params.yaml"), [])
    return evaluate_model(root / "models/base", root / "data", recipe.evaluation, device="cpu", root=root)["ppl"]


def test_push_then_clones_pull_same_data(tmp_path, tiny_model_dir, s3_env, monkeypatch):
    import boto3

    (tmp_path / "first").mkdir()
    first = make_project(tmp_path / "first", tiny_recipe(tiny_model_dir, "tiny-dvc"))
    # the remote as a team commits it: a name and a bucket URL, no endpoint, no credentials
    assert dvc(first, "remote", "add", "team", s3_env["url"]).returncode == 0
    git(first, "add", ".dvc/config")
    git(first, "commit", "-qm", "team remote")
    assert "endpoint" not in (first / ".dvc/config").read_text()
    monkeypatch.setenv(L.REMOTE_ENV, "team")

    remote = L.shared_remote(first)
    assert remote == ("team", None, s3_env["url"])
    ran = L.reproduce(first, remote=remote)
    assert sorted(ran) == ["fetch_model", "prepare_data"]
    hashes = L.dvc_lock_hashes(first)
    assert set(hashes) == {"models/base", "data"} and all(hashes.values())
    s3 = boto3.client("s3", endpoint_url=s3_env["env"]["AWS_ENDPOINT_URL"], region_name="us-east-1")
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_env["bucket"],
                                                                           Prefix=s3_env["prefix"] + "/")
            for o in p.get("Contents", [])]
    for md5 in hashes.values():  # both outputs are directories: their .dir listing is on S3
        assert f"{s3_env['prefix']}/files/md5/{md5[:2]}/{md5[2:]}" in keys, (md5, keys[:5])
    n_files = len(tree(first / "models/base")) + len(tree(first / "data"))
    assert len(keys) >= n_files + 2
    git(first, "add", "dvc.lock")
    git(first, "commit", "-qm", "data")

    # second clone, the flow's path: no DVC cache, no outputs; repro pulls instead of running stages
    second = tmp_path / "second"
    git(tmp_path, "clone", "-q", str(first), str(second))
    assert not (second / "models").exists() and not (second / ".dvc/cache").exists()
    assert L.reproduce(second, remote=L.shared_remote(second)) == []
    assert L.dvc_lock_hashes(second) == hashes
    assert (second / "dvc.lock").read_text() == (first / "dvc.lock").read_text()
    assert tree(second / "models/base") == tree(first / "models/base")
    assert tree(second / "data") == tree(first / "data")
    assert any((second / ".dvc/cache").rglob("*")), "pulled objects land in the clone's own cache"

    # third clone, a person's path: `dvc pull -r team` with the endpoint and keys from the environment
    third = tmp_path / "third"
    git(tmp_path, "clone", "-q", str(first), str(third))
    pulled = dvc(third, "pull", "-r", "team")
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    status = dvc(third, "status")
    assert status.returncode == 0 and "up to date" in status.stdout.lower(), status.stdout
    assert tree(third / "models/base") == tree(first / "models/base") and tree(third / "data") == tree(first / "data")

    # same baseline metrics from the pulled data
    assert baseline_ppl(second) == pytest.approx(baseline_ppl(first), rel=1e-6)


def test_committed_remote_is_the_team_bucket_without_secrets():
    """The repository's .dvc/config names the team's DVC bucket (infra/team.yaml) and nothing about
    where it is served or with which key: those come from the environment or `--local` config."""
    from dvc.config import Config

    from tasks.team.config import load_spec

    text = (ROOT / ".dvc" / "config").read_text()
    config = Config.load_file(str(ROOT / ".dvc" / "config"))
    assert config["core"]["remote"] == "local"  # the embedded default shares nothing
    assert config["remote"]["team"]["url"] == f"s3://{load_spec()['s3']['buckets']['dvc']}"
    for word in ("endpointurl", "access_key", "secret", "password", "127.0.0.1", "localhost"):
        assert word not in text


def test_remote_choice(tmp_path, monkeypatch):
    """Embedded default: the local remote, nothing pushed; an S3 default remote or the variable
    (a remote name or an s3:// URL) selects the shared one; anything else is refused."""
    project = tmp_path / "p"
    project.mkdir()
    git(project, "init", "-q")
    assert dvc(project, "init", "-q").returncode == 0
    monkeypatch.delenv(L.REMOTE_ENV, raising=False)
    assert L.shared_remote(project) is None  # no remote at all
    assert dvc(project, "remote", "add", "-d", "local", "../dvc-storage").returncode == 0
    assert L.shared_remote(project) is None  # a local default remote: nothing shared
    assert dvc(project, "remote", "add", "team", "s3://frugalflow-dvc/x").returncode == 0
    assert L.shared_remote(project) is None  # an S3 remote that is not the default and not asked for
    monkeypatch.setenv(L.REMOTE_ENV, "team")
    assert L.shared_remote(project) == ("team", None, "s3://frugalflow-dvc/x")
    monkeypatch.setenv(L.REMOTE_ENV, "s3://other-bucket/p")
    assert L.shared_remote(project) == (L.ENV_REMOTE, {"url": "s3://other-bucket/p"}, "s3://other-bucket/p")
    for bad, said in (("nope", "no DVC remote of that name"), ("local", "not on S3"),
                      ("gs://bucket/x", "s3://BUCKET")):
        monkeypatch.setenv(L.REMOTE_ENV, bad)
        with pytest.raises(ValueError, match=said):
            L.shared_remote(project)
    monkeypatch.delenv(L.REMOTE_ENV)
    assert dvc(project, "remote", "default", "--local", "team").returncode == 0
    assert L.shared_remote(project) == ("team", None, "s3://frugalflow-dvc/x")  # default set in --local config
