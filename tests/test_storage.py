"""tasks/storage.py against a real S3 API server: moto's server mode in a subprocess on 127.0.0.1."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port

from tasks import storage as S

pytestmark = pytest.mark.slow  # starts a real server (about 1 s)


@pytest.fixture(scope="module")
def s3_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start on {url} (exit code {proc.poll()})")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the helpers at the moto server through the environment, with dummy credentials."""
    for name in S.ENDPOINT_ENV + ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FRUGALFLOW_S3_ENDPOINT", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


def make_tree(root):
    files = {
        "config.json": b'{"hidden_size": 64}\n',
        "model.safetensors": os.urandom(300_000),
        "tokenizer/tokenizer.json": b"{}",
        "tokenizer/sub/deep/vocab.txt": "caf\u00e9\n\u00fcber\n".encode(),
        "empty.bin": b"",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_round_trip_nested_directory_bytes_identical(s3_env, tmp_path):
    assert S.ensure_bucket("frugalflow-models") is True
    assert S.ensure_bucket("frugalflow-models") is False  # already there
    files = make_tree(tmp_path / "src")

    keys = S.upload_dir(tmp_path / "src", "frugalflow-models", "smollm2/v1/")
    assert keys == sorted(f"smollm2/v1/{rel}" for rel in files)
    listed = S.s3_client().list_objects_v2(Bucket="frugalflow-models")["Contents"]
    assert sorted(o["Key"] for o in listed) == keys

    # a sibling prefix sharing the first characters must not leak into the download
    S.s3_client().put_object(Bucket="frugalflow-models", Key="smollm2/v10/other.txt", Body=b"x")
    paths = S.download_dir("frugalflow-models", "smollm2/v1", tmp_path / "dst")
    assert len(paths) == len(files)
    assert tree_bytes(tmp_path / "dst") == files


def test_upload_without_prefix_and_publish_model(s3_env, tmp_path):
    S.ensure_bucket("frugalflow-root")
    files = make_tree(tmp_path / "m")
    assert S.upload_dir(tmp_path / "m", "frugalflow-root", "") == sorted(files)

    uri = S.publish_model.fn(str(tmp_path / "m"), "s3://frugalflow-root/published/run-1/")
    assert uri == "s3://frugalflow-root/published/run-1"
    S.download_dir("frugalflow-root", "published/run-1", tmp_path / "back")
    assert tree_bytes(tmp_path / "back") == files


def test_missing_bucket_error_names_bucket_and_endpoint(s3_env, tmp_path):
    make_tree(tmp_path / "m")
    with pytest.raises(S.BucketNotFound) as info:
        S.upload_dir(tmp_path / "m", "no-such-bucket-xyz", "p")
    assert "'no-such-bucket-xyz'" in str(info.value) and s3_env in str(info.value)
    with pytest.raises(S.BucketNotFound, match="no-such-bucket-xyz"):
        S.download_dir("no-such-bucket-xyz", "p", tmp_path / "out")
    with pytest.raises(S.BucketNotFound, match="no-such-bucket-xyz"):
        S.publish_model.fn(str(tmp_path / "m"), "s3://no-such-bucket-xyz/model")


def test_empty_prefix_and_bad_inputs_are_errors(s3_env, tmp_path):
    S.ensure_bucket("frugalflow-empty")
    with pytest.raises(S.StorageError, match="nothing under s3://frugalflow-empty/missing/"):
        S.download_dir("frugalflow-empty", "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.StorageError, match="holds no files"):
        S.upload_dir(tmp_path / "empty", "frugalflow-empty", "x")
    with pytest.raises(NotADirectoryError):
        S.upload_dir(tmp_path / "absent", "frugalflow-empty", "x")
    with pytest.raises(ValueError, match="not an S3 URI"):
        S.publish_model.fn(str(tmp_path), "frugalflow-empty/x")


def test_run_clients_back_off_and_checks_fail_at_once(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert S.s3_client().meta.config.retries["total_max_attempts"] == S.MAX_ATTEMPTS == 12
    assert S.s3_client(quick=True).meta.config.retries["total_max_attempts"] == S.QUICK_ATTEMPTS == 2


def test_unreachable_endpoint_ends_with_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(S, "MAX_ATTEMPTS", 2)  # the run's back-off (tests/test_team_outages.py) cut short
    port = free_port()  # nothing listens there: connection refused
    endpoint = f"http://127.0.0.1:{port}"
    for name in S.ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    make_tree(tmp_path / "m")
    for call in (lambda: S.upload_dir(tmp_path / "m", "frugalflow-models", "p"),
                 lambda: S.download_dir("frugalflow-models", "p", tmp_path / "out"),
                 lambda: S.ensure_bucket("frugalflow-models")):
        start = time.monotonic()
        with pytest.raises(S.EndpointUnreachable) as info:
            call()
        assert time.monotonic() - start < 10
        message = str(info.value)
        assert endpoint in message and "'frugalflow-models'" in message
    assert isinstance(info.value, ConnectionError)


def test_endpoint_precedence(monkeypatch):
    for name in S.ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)
    assert S.endpoint_url() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://b:9000")
    assert S.endpoint_url() == "http://b:9000"
    monkeypatch.setenv("FRUGALFLOW_S3_ENDPOINT", "http://a:9000")
    assert S.endpoint_url() == "http://a:9000"
    assert S.s3_client().meta.endpoint_url == "http://a:9000"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "alice")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    alice = S.s3_client()
    assert S.s3_client() is alice  # reused while the environment is unchanged
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "bob")
    bob = S.s3_client()
    assert bob is not alice and bob._request_signer._credentials.access_key == "bob"
    assert S.parse_s3_uri("s3://bkt/a/b/") == ("bkt", "a/b")
    assert S.parse_s3_uri("s3://bkt") == ("bkt", "")


def test_registered_version_is_published_to_the_models_bucket(s3_env, tmp_path, monkeypatch):
    """The flow's use of this module (tasks/promote.py): with FRUGALFLOW_MODELS_URI set, a registered
    version's model directory lands under <uri>/<model>/v<N> and the version is tagged with it; unset,
    nothing is uploaded."""
    from mlflow import MlflowClient

    from tasks import tracking as T
    from tasks.promote import MODELS_URI_ENV, register_and_promote

    S.ensure_bucket("frugalflow-published")
    model_dir = tmp_path / "model"
    files = make_tree(model_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = T.connect(uri)
    exp = T.experiment_id(client, "publish", tmp_path / "mlartifacts")
    verdict = {"passed": True, "objective": "ppl", "reasons": []}

    def candidate(ppl: float) -> T.Tracking:
        run = T.start_run(client, exp, f"candidate-{ppl}")
        T.log_metrics(client, run, {"candidate.ppl": ppl})
        return T.Tracking(uri=uri, experiment_id=exp, parent_run_id=run)

    monkeypatch.delenv(MODELS_URI_ENV, raising=False)
    first = register_and_promote.fn(verdict, "tiny-pub", {}, candidate(20.0), model_dir=str(model_dir))
    assert first == {"registered": True, "version": "1", "champion": True}
    assert "s3_uri" not in MlflowClient(uri, uri).get_model_version("tiny-pub", "1").tags
    assert "Contents" not in S.s3_client().list_objects_v2(Bucket="frugalflow-published")

    monkeypatch.setenv(MODELS_URI_ENV, "s3://frugalflow-published/published/")
    second = register_and_promote.fn(verdict, "tiny-pub", {}, candidate(25.0), model_dir=str(model_dir))
    assert second == {"registered": True, "version": "2", "champion": False}  # worse ppl: published, not promoted
    version = MlflowClient(uri, uri).get_model_version("tiny-pub", "2")
    assert version.tags["s3_uri"] == "s3://frugalflow-published/published/tiny-pub/v2"
    S.download_dir("frugalflow-published", "published/tiny-pub/v2", tmp_path / "back")
    assert tree_bytes(tmp_path / "back") == files


def test_stage_store_shares_a_stage_between_workers_that_share_no_folder(s3_env, tmp_path, tiny_model_dir,
                                                                         prefect_harness, monkeypatch):
    """A stage store (FRUGALFLOW_STAGE_STORE, passed by the flow as `store`): worker A computes a stage
    and uploads it (manifest last); worker B, with
    its own empty artifacts folder, fetches it instead of computing (same bytes, checksums verified);
    A again finds it already there; an entry damaged in the store is refused, naming it."""
    import boto3

    import tasks.compress as C
    from frugalflow.config import MagnitudePrune
    from frugalflow.errors import CorruptData
    from frugalflow.integrity import MANIFEST
    from tasks import tracking as T
    S.ensure_bucket("stages")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = T.connect(uri)
    exp = T.experiment_id(client, "store", tmp_path / "mlartifacts")
    tracking = T.Tracking(uri=uri, experiment_id=exp, parent_run_id=T.start_run(client, exp, "parent"))

    def stage_on(worker: str) -> dict:
        return C.compress_stage(MagnitudePrune(method="magnitude", sparsity=0.5), 0, str(tiny_model_dir), "base",
                                data_dir=str(tmp_path / "data"), data_key="data", teacher_dir=str(tiny_model_dir),
                                artifacts_dir=str(tmp_path / worker), device="cpu", seed=0, pruned=False,
                                tracking=tracking, store="s3://stages/cache")

    def shared(result: dict) -> str:
        return client.get_run(result["run_id"]).data.tags.get("frugalflow.stage_store")

    a = stage_on("worker-a")
    assert not a["cached"] and shared(a) == "uploaded"
    name = Path(a["dir"]).name
    s3 = boto3.client("s3", endpoint_url=s3_env)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="stages", Prefix=f"cache/{name}/")["Contents"]]
    local = sorted(p.relative_to(a["dir"]).as_posix() for p in Path(a["dir"]).rglob("*") if p.is_file())
    assert sorted(k.removeprefix(f"cache/{name}/") for k in keys) == local and MANIFEST in local

    real = C.run_stage
    monkeypatch.setattr(C, "run_stage", lambda *a, **k: pytest.fail("worker B computed a stage the store holds"))
    b = stage_on("worker-b")
    assert b["cached"] and shared(b) == "fetched" and b["key"] == a["key"] and Path(b["dir"]).name == name
    for rel in local:
        assert (Path(b["dir"]) / rel).read_bytes() == (Path(a["dir"]) / rel).read_bytes()
    monkeypatch.setattr(C, "run_stage", real)

    again = stage_on("worker-a")
    assert again["cached"] and shared(again) == "present"

    s3.put_object(Bucket="stages", Key=f"cache/{name}/model.safetensors", Body=b"damaged")
    with pytest.raises(CorruptData, match=f"stage store entry s3://stages/cache/{name}"):
        stage_on("worker-c")
    assert not (tmp_path / "worker-c" / "stages" / name).exists()


def test_stage_store_inputs_and_local_copies(s3_env, tmp_path):
    """A flow input (a folder with its own manifest.json, as data/ has) goes to the store under
    payload/ beside the store's manifest; a worker's copy is downloaded once, a damaged copy is
    moved aside and fetched again, and an entry the store lacks is an error that names it."""
    from tasks import stage_store as SS

    S.ensure_bucket("stages")
    uri = "s3://stages/cache"
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"window": 64}\n')
    (data / "calib.safetensors").write_bytes(os.urandom(5000))
    name = SS.input_name("data", "", data)  # no DVC key: a digest of the files
    assert name.startswith("data-") and name == SS.input_name("data", "", data)
    assert SS.publish_input(data, name, uri) and not SS.publish_input(data, name, uri)  # uploaded once
    worker = tmp_path / "worker"
    got = SS.fetch_input(name, uri, worker)
    assert got == worker / name / "payload" and tree_bytes(got) == tree_bytes(data)
    (got / "manifest.json").write_text('{"window": 32}\n')  # the input's own manifest is checked too
    again = SS.fetch_input(name, uri, worker)
    assert tree_bytes(again) == tree_bytes(data)
    assert [p.name.split(".corrupt-")[0] for p in worker.glob("*.corrupt-*")] == [name]
    with pytest.raises(S.StorageError, match="s3://stages/cache/inputs/data-missing"):
        SS.fetch_input("data-missing", uri, worker)
