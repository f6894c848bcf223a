"""The team's S3 API (the `team_stack` fixture, tasks/team/s3_server.py) checks who asks and keeps
what it acknowledged: a wrong secret, an unknown key or an unsigned request is refused, each key
reaches only its own buckets (the DVC/worker key not the MLflow artifacts bucket, the MLflow
server's key not the DVC bucket); objects written directly and an artifact written through the
MLflow server are all there after a SIGKILL of the S3 server and `team up`."""
from __future__ import annotations

import os
import signal

import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError
from helpers import wait_for

pytestmark = pytest.mark.slow


def refused(call) -> str:
    with pytest.raises(ClientError) as info:
        call()
    return info.value.response["Error"]["Code"]


def test_every_request_is_checked_against_its_key(team_stack):
    from tasks.team import s3

    team, buckets = team_stack.team, team_stack.buckets
    worker, mlflow = team_stack.s3("worker"), team_stack.s3("mlflow")
    worker.put_object(Bucket=buckets["dvc"], Key="auth/ok.txt", Body=b"ok")
    assert worker.get_object(Bucket=buckets["dvc"], Key="auth/ok.txt")["Body"].read() == b"ok"
    access, _ = team.s3_key("worker")
    assert refused(lambda: s3.client(team, (access, "not-the-secret")).list_objects_v2(
        Bucket=buckets["dvc"])) == "SignatureDoesNotMatch"
    assert refused(lambda: s3.client(team, ("AKNOSUCHKEY0000", "x" * 24)).list_objects_v2(
        Bucket=buckets["dvc"])) == "InvalidAccessKeyId"
    import boto3

    anonymous = boto3.client("s3", endpoint_url=team_stack.s3_endpoint, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}))
    assert refused(lambda: anonymous.list_objects_v2(Bucket=buckets["dvc"])) == "AccessDenied"
    assert refused(lambda: anonymous.put_object(Bucket=buckets["dvc"], Key="x", Body=b"x")) == "AccessDenied"
    # each key reaches its own buckets only
    assert refused(lambda: worker.list_objects_v2(Bucket=buckets["mlflow"])) == "AccessDenied"
    assert refused(lambda: worker.put_object(Bucket=buckets["mlflow"], Key="x", Body=b"x")) == "AccessDenied"
    assert refused(lambda: mlflow.get_object(Bucket=buckets["dvc"], Key="auth/ok.txt")) == "AccessDenied"
    assert refused(lambda: mlflow.put_object(Bucket=buckets["models"], Key="x", Body=b"x")) == "AccessDenied"
    mlflow.list_objects_v2(Bucket=buckets["mlflow"])  # its own bucket: allowed


def test_objects_survive_a_sigkill_of_the_s3_server(team_stack, tmp_path):
    from mlflow import MlflowClient

    buckets, worker = team_stack.buckets, team_stack.s3("worker")
    big = os.urandom(12 * 1024 * 1024)  # multipart upload through boto3's transfer manager
    (tmp_path / "big.bin").write_bytes(big)
    worker.upload_file(str(tmp_path / "big.bin"), buckets["models"], "kill/big.bin")
    worker.put_object(Bucket=buckets["dvc"], Key="kill/small.txt", Body=b"small", Metadata={"note": "kept"})
    worker.put_object(Bucket=buckets["dvc"], Key="kill/deleted.txt", Body=b"gone")
    worker.delete_object(Bucket=buckets["dvc"], Key="kill/deleted.txt")
    client = MlflowClient(team_stack.mlflow_uri)  # the member; the artifact goes through the server to S3
    run = client.create_run(client.create_experiment(f"s3-kill-{os.getpid()}")).info.run_id
    client.log_text(run, "written before the kill", "note.txt")

    pid = team_stack.status()["s3"]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: team_stack.status()["s3"]["health"] == "down", 30, 0.5)
    team_stack.start()  # `team up`: only the S3 server starts again

    worker = team_stack.s3("worker")
    assert worker.get_object(Bucket=buckets["models"], Key="kill/big.bin")["Body"].read() == big
    small = worker.get_object(Bucket=buckets["dvc"], Key="kill/small.txt")
    assert small["Body"].read() == b"small" and small["Metadata"] == {"note": "kept"}
    assert refused(lambda: worker.get_object(Bucket=buckets["dvc"], Key="kill/deleted.txt")) == "NoSuchKey"
    target = client.download_artifacts(run, "note.txt", str(tmp_path))
    assert open(target).read() == "written before the kill"
    assert {row["health"] for row in team_stack.status().values()} == {"healthy"}
