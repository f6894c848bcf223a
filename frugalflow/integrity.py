"""Atomic writes and content checksums for everything a later run reuses.

A file is written to a temporary sibling, flushed and fsynced, then renamed over its name, so a
reader sees the old content, the new content, or nothing, never half a file. A directory entry
(a stage output) is built in a temporary sibling directory with a `manifest.json` of every file's
size and SHA-256, fsynced, and renamed into place. `verify_manifest` / `read_json_checked` /
`read_checksummed` raise CorruptData naming the file when an entry is truncated or altered; the
caller recomputes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from frugalflow.errors import CorruptData

MANIFEST = "manifest.json"
_MAGIC = b"frugalflow-sha256 "  # header of a checksummed binary file: magic, 64 hex digits, newline


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- JSON with a checksum
def write_json_checked(path: str | Path, obj) -> Path:
    """`{"sha256": ..., "data": obj}` written atomically; read back with read_json_checked."""
    body = json.dumps(obj, sort_keys=True, default=float)
    return atomic_write_bytes(path, (json.dumps({"sha256": sha256_bytes(body.encode()), "data": json.loads(body)},
                                                indent=1, sort_keys=True) + "\n").encode())


def read_json_checked(path: str | Path):
    path = Path(path)
    try:
        wrapper = json.loads(path.read_text())
        body = json.dumps(wrapper["data"], sort_keys=True, default=float)
        expected = wrapper["sha256"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptData(f"{path}: not a complete checksummed JSON entry ({type(exc).__name__}: {exc})") from None
    if sha256_bytes(body.encode()) != expected:
        raise CorruptData(f"{path}: content does not match its checksum (altered or damaged)")
    return wrapper["data"]


# --------------------------------------------------------------------------- binary with a checksum
def write_checksummed(path: str | Path, payload: bytes) -> Path:
    """`payload` behind a header holding its SHA-256, written atomically (checkpoints)."""
    return atomic_write_bytes(path, _MAGIC + sha256_bytes(payload).encode() + b"\n" + payload)


def read_checksummed(path: str | Path) -> bytes:
    path = Path(path)
    raw = path.read_bytes()
    head = len(_MAGIC) + 65
    if not raw.startswith(_MAGIC) or len(raw) < head or raw[head - 1:head] != b"\n":
        raise CorruptData(f"{path}: no checksum header (truncated or not written by frugalflow)")
    expected, payload = raw[len(_MAGIC):head - 1].decode("ascii", "replace"), raw[head:]
    if sha256_bytes(payload) != expected:
        raise CorruptData(f"{path}: {len(payload)} bytes do not match their checksum (truncated or altered)")
    return payload


# --------------------------------------------------------------------------- directories
def write_manifest(folder: str | Path) -> dict:
    """Record size and SHA-256 of every file in `folder` (recursively) in its manifest.json."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / MANIFEST}
    write_json_checked(folder / MANIFEST, files)
    return files


def verify_manifest(folder: str | Path) -> None:
    """Raise CorruptData naming the first file that is missing, extra, truncated or altered."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise CorruptData(f"{folder / MANIFEST}: missing (an unfinished or pre-checksum entry)")
    files = read_json_checked(folder / MANIFEST)
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST}
    if extra := sorted(present - set(files)):
        raise CorruptData(f"{folder / extra[0]}: not in the manifest (written after the entry was sealed)")
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptData(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise CorruptData(f"{path}: {size} bytes, the manifest says {meta['bytes']} (truncated or altered)")
        if sha256_file(path) != meta["sha256"]:
            raise CorruptData(f"{path}: content does not match its SHA-256 in the manifest (altered or damaged)")


def temp_sibling(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def seal_dir(tmp: str | Path, folder: str | Path) -> Path:
    """Write tmp's manifest, fsync its files, and rename it to `folder` (which must not exist)."""
    tmp, folder = Path(tmp), Path(folder)
    write_manifest(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(tmp)
    os.rename(tmp, folder)
    fsync_dir(folder.parent)
    return folder


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temporary siblings `.<name>.tmp-*` that a killed writer left; call under the entry's lock."""
    folder = Path(folder)
    stale = sorted([*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f"..{folder.name}.tmp-*")])
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return stale


def quarantine(folder: str | Path) -> Path:
    """Move a corrupt entry out of the way (kept for inspection, never reused): `<name>.corrupt-<id>`."""
    folder = Path(folder)
    target = folder.with_name(f"{folder.name}.corrupt-{uuid.uuid4().hex[:6]}")
    os.rename(folder, target)
    return target


# --------------------------------------------------------------------------- checkpoints
def content_digest(obj) -> str:
    """SHA-256 over a nest of dicts, lists, tensors and scalars (tensor bytes, dtypes and shapes)."""
    import torch

    digest = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, dict):
            digest.update(b"{")
            for k in sorted(x, key=str):
                digest.update(repr(k).encode())
                walk(x[k])
            digest.update(b"}")
        elif isinstance(x, (list, tuple)):
            digest.update(b"[")
            for v in x:
                walk(v)
            digest.update(b"]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(x).encode())

    walk(obj)
    return digest.hexdigest()


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """A torch checkpoint with the SHA-256 of its content under "sha256", written atomically."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({**obj, "sha256": content_digest(obj)}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path | None) -> dict | None:
    """The checkpoint at `path`; None when there is none, or when it is unreadable or fails its
    checksum (then it is logged, moved to `<name>.corrupt-<id>`, and the caller starts over
    instead of failing forever)."""
    import logging

    import torch

    if path is None or not Path(path).is_file():
        return None
    path = Path(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, bad pickle: torch raises several kinds
            raise CorruptData(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(state, dict) or "sha256" not in state:
            raise CorruptData(f"{path}: no content checksum (not written by this version)")
        expected = state.pop("sha256")
        if content_digest(state) != expected:
            raise CorruptData(f"{path}: content does not match its checksum (altered or damaged)")
        return state
    except CorruptData as exc:
        moved = quarantine(path)
        logging.getLogger("frugalflow").warning("checkpoint not used: %s; moved to %s, training from the start",
                                                exc, moved.name)
        return None
