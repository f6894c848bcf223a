"""The shared stage store: sealed stage outputs in S3 under their content-key names, so that workers
which share no folder (a Dask sweep, team workers) reuse what another one computed.

    FRUGALFLOW_STAGE_STORE=s3://frugalflow-stages/cache   # unset: stages live in artifacts/ only

An entry is `<prefix>/<stage dir name>/` with the files of the sealed local folder; the manifest
(frugalflow/integrity.py) is uploaded last, so an entry whose manifest is there is complete. A
fetched entry is downloaded into a temporary sibling, checked against its manifest and renamed into
place: complete or absent locally too. The endpoint and credentials are tasks/storage.py's.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from frugalflow.errors import CorruptData
from frugalflow.integrity import MANIFEST, temp_sibling, verify_manifest
from tasks.storage import download_dir, object_exists, parse_s3_uri, upload_dir

STORE_ENV = "FRUGALFLOW_STAGE_STORE"


def store_uri() -> str | None:
    return os.environ.get(STORE_ENV, "").strip() or None


def _where(uri: str, out_dir: Path) -> tuple[str, str]:
    bucket, prefix = parse_s3_uri(uri)
    return bucket, f"{prefix.strip('/')}/{out_dir.name}" if prefix.strip("/") else out_dir.name


def fetch(out_dir: Path, uri: str) -> bool:
    """Bring the store's entry for `out_dir` (by its name) into place; False when the store has no
    complete entry. A downloaded entry that fails its manifest raises CorruptData."""
    bucket, prefix = _where(uri, out_dir)
    if not object_exists(bucket, f"{prefix}/{MANIFEST}"):
        return False
    tmp = temp_sibling(out_dir)
    try:
        download_dir(bucket, prefix, tmp)
        try:
            verify_manifest(tmp)
        except CorruptData as exc:
            raise CorruptData(f"stage store entry s3://{bucket}/{prefix}: {exc}") from None
        os.rename(tmp, out_dir)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def publish(out_dir: Path, uri: str) -> bool:
    """Upload the sealed `out_dir` unless the store already holds a complete entry of that name;
    True when this call uploaded it."""
    bucket, prefix = _where(uri, out_dir)
    if object_exists(bucket, f"{prefix}/{MANIFEST}"):
        return False
    upload_dir(out_dir, bucket, prefix, last=MANIFEST)
    return True
