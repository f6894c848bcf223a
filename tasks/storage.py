"""S3 storage helpers (boto3) for team mode: copy a directory to and from a bucket.

    upload_dir("artifacts/stages/2-kl-ab12", "frugalflow-models", "smollm2/v7")  # -> keys
    download_dir("frugalflow-models", "smollm2/v7", "models/candidate")
    ensure_bucket("frugalflow-models")

The endpoint comes from `FRUGALFLOW_S3_ENDPOINT`, else `AWS_ENDPOINT_URL_S3`, else
`AWS_ENDPOINT_URL` (MinIO, moto's server, ...); with none set, AWS S3 itself.
Credentials are boto3's usual ones (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
Connections time out after a few seconds and are retried once, so an unreachable
endpoint fails fast; every failure is a `StorageError` naming the endpoint and bucket.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError
from prefect import task

ENDPOINT_ENV = ("FRUGALFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 60
QUICK_ATTEMPTS = 2  # checks before a run or command starts: the first try and one retry, so a dead endpoint is named at once
MAX_ATTEMPTS = 12  # everything else: botocore's exponential back-off (up to 20 s apart), about 1-2 minutes in all
# environment that decides which client we get: a client is reused while these stay the same
CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
              "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


class StorageError(RuntimeError):
    """An S3 operation failed; the message names the endpoint and the bucket."""


class EndpointUnreachable(StorageError, ConnectionError):
    """No S3 server answered at the endpoint."""


class BucketNotFound(StorageError, FileNotFoundError):
    """The bucket does not exist at the endpoint."""


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment; None means AWS S3."""
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def s3_client(endpoint: str | None = None, *, quick: bool = False):
    """A boto3 S3 client with a short connect timeout that retries with back-off (an object store
    restarted mid-run is waited for), or with `quick` only once; path-style addressing for custom
    endpoints (MinIO and moto serve buckets under the path, not the host name). Building a client
    costs ~0.3 s, so one is kept per endpoint, credential environment and kind."""
    return _client(endpoint or endpoint_url(), tuple(os.environ.get(name) for name in CLIENT_ENV),
                   QUICK_ATTEMPTS if quick else MAX_ATTEMPTS)


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, env: tuple, attempts: int):
    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    retries={"total_max_attempts": attempts, "mode": "standard"},
                    s3={"addressing_style": "path" if endpoint else "auto"})
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, region_name=session.region_name or "us-east-1",
                          config=config)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an S3 URI (want s3://BUCKET/PREFIX): {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def _where(client, bucket: str) -> str:
    return f"bucket {bucket!r} at S3 endpoint {client.meta.endpoint_url}"


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _errors(client, bucket: str, doing: str):
    """Turn boto3's exceptions into StorageErrors that say where and what."""
    try:
        yield
    except (BotoConnectionError, HTTPClientError) as exc:
        raise EndpointUnreachable(
            f"cannot reach the S3 endpoint {client.meta.endpoint_url} ({doing}, bucket {bucket!r}): "
            f"{exc}. Is the server up? The endpoint comes from {' / '.join(ENDPOINT_ENV)}.") from None
    except NoCredentialsError:
        raise StorageError(f"no S3 credentials for {_where(client, bucket)} ({doing}): set AWS_ACCESS_KEY_ID "
                           "and AWS_SECRET_ACCESS_KEY (or an AWS profile)") from None
    except ClientError as exc:
        code = _error_code(exc)
        if code in ("404", "NoSuchBucket"):
            raise BucketNotFound(f"{_where(client, bucket)} does not exist ({doing}); create it with "
                                 "tasks.storage.ensure_bucket or the minio-init service") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"access denied to {_where(client, bucket)} ({doing}, {code}): check "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
        raise StorageError(f"{doing} failed on {_where(client, bucket)}: {exc}") from None
    except S3UploadFailedError as exc:
        raise StorageError(f"{doing} failed on {_where(client, bucket)}: {exc}") from None
    except BotoCoreError as exc:
        raise StorageError(f"{doing} failed on {_where(client, bucket)}: {exc}") from None


def _check_bucket(client, bucket: str, doing: str) -> None:
    with _errors(client, bucket, doing):
        client.head_bucket(Bucket=bucket)


def _join(prefix: str, rel: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{rel}" if prefix else rel


def ensure_bucket(bucket: str, *, endpoint: str | None = None) -> bool:
    """Create the bucket if it is missing; True when it was created."""
    client = s3_client(endpoint)
    try:
        _check_bucket(client, bucket, "checking the bucket")
        return False
    except BucketNotFound:
        pass
    kwargs = {}
    region = client.meta.region_name
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    with _errors(client, bucket, "creating the bucket"):
        try:
            client.create_bucket(Bucket=bucket, **kwargs)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou",):
                raise
            return False
    return True


def upload_dir(local_dir: str | Path, bucket: str, prefix: str, *, endpoint: str | None = None,
               last: str | None = None) -> list[str]:
    """Upload every file under `local_dir` to `s3://bucket/prefix/<relative path>`; the keys, sorted
    (the file at relative path `last`, when given, is uploaded after all the others)."""
    root = Path(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"upload_dir: {root} is not a directory")
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: (p.relative_to(root).as_posix() == last, p))
    if not files:
        raise StorageError(f"upload_dir: {root} holds no files; nothing to upload to s3://{bucket}/{prefix}")
    client = s3_client(endpoint)
    _check_bucket(client, bucket, f"uploading {root}")
    keys = []
    for path in files:
        key = _join(prefix, path.relative_to(root).as_posix())
        with _errors(client, bucket, f"uploading {path} to key {key!r}"):
            client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def object_exists(bucket: str, key: str, *, endpoint: str | None = None) -> bool:
    """Whether `s3://bucket/key` exists (the bucket itself must)."""
    client = s3_client(endpoint)
    _check_bucket(client, bucket, f"looking up key {key!r}")
    with _errors(client, bucket, f"looking up key {key!r}"):
        try:
            client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return True


def download_dir(bucket: str, prefix: str, local_dir: str | Path, *, endpoint: str | None = None) -> list[Path]:
    """Download every object under `s3://bucket/prefix/` into `local_dir`, keeping the relative
    layout; the local paths, sorted. An empty prefix (no objects) is an error."""
    root = Path(local_dir)
    client = s3_client(endpoint)
    _check_bucket(client, bucket, f"downloading s3://{bucket}/{prefix}")
    list_prefix = _join(prefix, "") if prefix.strip("/") else ""
    keys = []
    with _errors(client, bucket, f"listing s3://{bucket}/{list_prefix}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=list_prefix):
            keys += [obj["Key"] for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    if not keys:
        raise StorageError(f"nothing under s3://{bucket}/{list_prefix} at S3 endpoint {client.meta.endpoint_url}")
    paths = []
    for key in sorted(keys):
        rel = PurePosixPath(key[len(list_prefix):])
        if rel.is_absolute() or ".." in rel.parts:
            raise StorageError(f"refusing to download key {key!r} from {_where(client, bucket)}: "
                               "it would land outside the target directory")
        path = root.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _errors(client, bucket, f"downloading key {key!r}"):
            client.download_file(bucket, key, str(path))
        paths.append(path)
    return paths


def _logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # called outside a flow or task run (e.g. `publish_model.fn`)
        return logging.getLogger(__name__)


@task(name="publish-model")
def publish_model(model_dir: str, s3_uri: str) -> str:
    """Upload a model directory to `s3://bucket/prefix`; the URI, normalized (no trailing slash).
    The bucket must already exist (a typo in the URI should fail, not create a bucket)."""
    bucket, prefix = parse_s3_uri(s3_uri)
    keys = upload_dir(model_dir, bucket, prefix)
    uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    total = sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())
    _logger().info("published %s to %s: %d files, %.1f MB", model_dir, uri, len(keys), total / 1e6)
    return uri
