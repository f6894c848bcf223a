"""The S3 API of local team mode: moto's S3 behind tasks/team/s3_server.py, which checks every
request's key against infra/team.yaml (each key reaches its own buckets only; unsigned requests are
refused) and writes every object to `<team folder>/s3/` before acknowledging it, so neither a SIGKILL
nor `team down` loses anything. MinIO takes this role in docker-compose."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tasks.team import procs
from tasks.team.config import Team


def client(team: Team, key: tuple[str, str] | None = None):
    import boto3
    from botocore.config import Config

    access, secret = key or team.s3_root
    return boto3.client("s3", endpoint_url=team.s3_endpoint, aws_access_key_id=access,
                        aws_secret_access_key=secret, region_name="us-east-1",
                        config=Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 2}))


def keys_spec(team: Team) -> dict[str, list]:
    """{name: [access key, secret key, buckets]} for the server: the root key reaches every bucket."""
    spec = team.spec["s3"]
    keys = {"root": [*team.s3_root, "*"]}
    for name, key in spec["keys"].items():
        keys[name] = [*team.s3_key(name), [spec["buckets"][b] for b in key["buckets"]]]
    return keys


def start(team: Team, timeout: float = 60) -> int:
    log = team.logs() / "s3.log"
    migrate_snapshot(team)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    env["FRUGALFLOW_S3_KEYS"] = json.dumps(keys_spec(team))  # secrets through the environment only
    pid = procs.start([sys.executable, "-m", "tasks.team.s3_server", "--host", team.host, "--port",
                       str(team.port("s3")), "--data", str(data_dir(team)), "--spec", "FRUGALFLOW_S3_KEYS"],
                      env=env, log=log, cwd=team.project_dir)
    procs.wait_until(lambda: healthy(team), pid, "S3 server", team.s3_endpoint, log, timeout)
    return pid


def healthy(team: Team) -> bool:
    try:
        client(team).list_buckets()
        return True
    except Exception:
        return False


def data_dir(team: Team) -> Path:
    return team.home / "s3"


def migrate_snapshot(team: Team) -> None:
    """Installations from before the write-through store kept a snapshot as `s3/<bucket>/...`: move
    it to `s3/objects/<bucket>/...`, where the server loads objects from."""
    root = data_dir(team)
    for bucket in team.buckets.values():
        old, new = root / bucket, root / "objects" / bucket
        if old.is_dir() and not new.exists():
            new.parent.mkdir(parents=True, exist_ok=True)
            old.rename(new)


def count_objects(team: Team) -> int:
    objects = data_dir(team) / "objects"
    return sum(1 for p in objects.rglob("*") if p.is_file() and ".tmp" not in p.name) if objects.is_dir() else 0


def ensure_buckets(team: Team) -> None:
    s3 = client(team)
    have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in team.buckets.values():
        if bucket not in have:
            s3.create_bucket(Bucket=bucket)
