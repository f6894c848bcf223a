"""The S3 API of local team mode: moto's server on loopback, the buckets of infra/team.yaml, and a
snapshot of every object under `<team folder>/s3/` so that `team down` and `up` lose nothing
(moto keeps objects in memory only). MinIO takes this role in docker-compose."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tasks.team import procs
from tasks.team.config import Team, TeamError


def client(team: Team, key: tuple[str, str] | None = None):
    import boto3
    from botocore.config import Config

    access, secret = key or team.s3_root
    return boto3.client("s3", endpoint_url=team.s3_endpoint, aws_access_key_id=access,
                        aws_secret_access_key=secret, region_name="us-east-1",
                        config=Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 2}))


def start(team: Team, timeout: float = 60) -> int:
    log = team.logs() / "s3.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    pid = procs.start([sys.executable, "-m", "moto.server", "-H", team.host, "-p", str(team.port("s3"))],
                      env=env, log=log, cwd=team.home)
    procs.wait_until(lambda: healthy(team), pid, "S3 server (moto)", team.s3_endpoint, log, timeout)
    return pid


def healthy(team: Team) -> bool:
    try:
        client(team).list_buckets()
        return True
    except Exception:
        return False


def snapshot_dir(team: Team) -> Path:
    return team.home / "s3"


def ensure_buckets(team: Team) -> None:
    s3 = client(team)
    have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in team.buckets.values():
        if bucket not in have:
            s3.create_bucket(Bucket=bucket)


def restore(team: Team) -> int:
    """Upload the snapshot's objects into the (fresh) server; the number of objects."""
    s3, count = client(team), 0
    root = snapshot_dir(team)
    for bucket in team.buckets.values():
        folder = root / bucket
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket, path.relative_to(folder).as_posix())
            count += 1
    return count


def snapshot(team: Team) -> int:
    """Download every object of every bucket into `s3/` (written beside it, then swapped in, so a
    failure leaves the previous snapshot whole); the number of objects."""
    s3, count = client(team), 0
    root = snapshot_dir(team)
    fresh = root.with_name("s3.new")
    shutil.rmtree(fresh, ignore_errors=True)
    for bucket in team.buckets.values():
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue  # a folder marker, no content
                if key.startswith("/") or ".." in Path(key).parts:
                    raise TeamError(f"S3 bucket {bucket}: object key {key!r} cannot be saved as a file")
                target = fresh / bucket / key
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, key, str(target))
                count += 1
    fresh.mkdir(parents=True, exist_ok=True)
    old = root.with_name("s3.old")
    shutil.rmtree(old, ignore_errors=True)
    if root.exists():
        root.rename(old)
    fresh.rename(root)
    shutil.rmtree(old, ignore_errors=True)
    return count
