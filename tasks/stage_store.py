"""The shared stage store: sealed stage outputs in S3 under their content-key names, so that workers
which share no folder (a Dask sweep, team workers) reuse what another one computed.

    FRUGALFLOW_STAGE_STORE=s3://frugalflow-stages/cache   # unset: stages live in artifacts/ only

An entry is `<prefix>/<stage dir name>/` with the files of the sealed local folder; the manifest
(frugalflow/integrity.py) is uploaded last, so an entry whose manifest is there is complete. A
fetched entry is downloaded into a temporary sibling, checked against its manifest and renamed into
place: complete or absent locally too. The endpoint and credentials are tasks/storage.py's.

A flow's inputs (the base model, the data) go to `<prefix>/inputs/<name>/payload/` beside their own
manifest, so that workers with an empty folder can start from the store (flows/workspace.py). Inside
a Dask worker, `cluster_lock` makes the workers of one cluster compute a shared stage once.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from frugalflow.errors import CorruptData
from frugalflow.integrity import MANIFEST, quarantine, sha256_file, temp_sibling, verify_manifest, write_manifest
from tasks.storage import StorageError, download_dir, object_exists, parse_s3_uri, upload_dir

STORE_ENV = "FRUGALFLOW_STAGE_STORE"
INPUTS = "inputs"  # entries of a flow's inputs: <prefix>/inputs/<name>/{payload/..., manifest.json}
PAYLOAD = "payload"


def store_uri() -> str | None:
    return os.environ.get(STORE_ENV, "").strip() or None


def _where(uri: str, name: str) -> tuple[str, str]:
    bucket, prefix = parse_s3_uri(uri)
    return bucket, f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name


def fetch(out_dir: Path, uri: str, name: str | None = None) -> bool:
    """Bring the store's entry `name` (default: `out_dir`'s name) into place at `out_dir`; False when
    the store has no complete entry. A downloaded entry that fails its manifest raises CorruptData."""
    bucket, prefix = _where(uri, name or out_dir.name)
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
    bucket, prefix = _where(uri, out_dir.name)
    if object_exists(bucket, f"{prefix}/{MANIFEST}"):
        return False
    upload_dir(out_dir, bucket, prefix, last=MANIFEST)
    return True


def input_name(kind: str, key: str, folder: Path) -> str:
    """The store name of a flow input: `<kind>-<content key>`, the DVC md5 when there is one, else a
    digest of the folder's files."""
    if not key:
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(folder)}\0{sha256_file(path)}\0".encode())
        key = digest.hexdigest()[:32]
    return f"{kind}-{key.removesuffix('.dir')}"


def publish_input(folder: Path, name: str, uri: str) -> bool:
    """Upload `folder` as the input entry `name` (its files under payload/, a manifest last) unless
    the store holds it already; True when this call uploaded it."""
    bucket, prefix = _where(uri, f"{INPUTS}/{name}")
    if object_exists(bucket, f"{prefix}/{MANIFEST}"):
        return False
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.publish-") as tmp:
        entry = Path(tmp)
        for path in (p for p in folder.rglob("*") if p.is_file()):  # links, not copies: same disk
            target = entry / PAYLOAD / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        write_manifest(entry)
        upload_dir(entry, bucket, prefix, last=MANIFEST)
    return True


def ensure_local(folder: Path, uri: str, name: str | None = None, why: str = "") -> Path:
    """`folder` as the store's entry `name` (default: the folder's name): a local copy is verified on
    every use (a damaged one is moved aside), a missing one downloaded; StorageError, saying `why`
    it should be there, when the store lacks it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if folder.exists():
            try:
                verify_manifest(folder)
                return folder
            except CorruptData:
                quarantine(folder)
        if not fetch(folder, uri, name):
            bucket, prefix = _where(uri, name or folder.name)
            raise StorageError(f"the stage store has no entry s3://{bucket}/{prefix}{why}")
    return folder


def fetch_input(name: str, uri: str, into: Path) -> Path:
    """The local folder of input entry `name`, under `into` (`ensure_local`)."""
    entry = ensure_local(into / name, uri, f"{INPUTS}/{name}",
                         ": the flow publishes its inputs before it sends work to the cluster")
    return entry / PAYLOAD


@contextlib.contextmanager
def cluster_lock(name: str):
    """Held by one Dask worker of a cluster at a time (a scheduler lease that a dead worker loses
    after `distributed.scheduler.locks.lease-timeout`); outside a Dask worker, no lock."""
    try:
        from distributed import Lock, get_worker

        get_worker()
    except (ImportError, ValueError):
        yield
        return
    with Lock(f"frugalflow-stage-{name}"):
        yield
