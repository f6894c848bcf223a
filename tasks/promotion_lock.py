"""One `champion` move at a time per registered model: the lock that promotion decides under.

Which lock depends on where the registry lives:
- a SQLite store (the embedded default): a file lock in the temporary folder, named after the
  database file's path (every process on the host that opens that store takes the same lock);
- a tracking server with a Prefect API set (team mode): a Prefect global concurrency limit
  `promote-<model>` of one slot, created on first use and held with a lease, so every client
  of the server is arbitrated by one place and a crashed holder's lease runs out;
- a tracking server without a Prefect API: a file lock in the temporary folder, which only
  keeps the promotions of this host apart (logged as a warning).
Team clients hold no database credentials, so a PostgreSQL advisory lock is not an option.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from pathlib import Path

from filelock import FileLock

from frugalflow.redact import redact
from tasks.gpu_slot import api_url

LOCK_TIMEOUT_S = 300
LEASE_S = 120
log = logging.getLogger(__name__)


class PromotionLockError(ConnectionError):
    """The promotion lock could not be taken (service unreachable or timed out)."""


def limit_name(model_name: str) -> str:
    return f"promote-{model_name}"


def sqlite_path(tracking_uri: str) -> Path | None:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):])
    return None


def _ensure_limit(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:  # another promotion created it first
            pass


@contextlib.contextmanager
def _prefect_lock(name: str, api: str):
    from prefect.concurrency.sync import concurrency

    held = contextlib.ExitStack()
    try:
        _ensure_limit(name)
        held.enter_context(concurrency(name, occupy=1, strict=True, timeout_seconds=LOCK_TIMEOUT_S,
                                       lease_duration=LEASE_S))
    except Exception as exc:
        raise PromotionLockError(f"cannot take the promotion lock (Prefect concurrency limit {name!r}) at the "
                                 f"Prefect API {api}: {type(exc).__name__}: {exc}. Is the Prefect server up "
                                 "(frugalflow team status)?") from None
    with held:
        yield


@contextlib.contextmanager
def promotion_lock(tracking_uri: str, model_name: str):
    """Hold the lock for `model_name` in the registry at `tracking_uri` while the block runs."""
    db = sqlite_path(tracking_uri)
    api = None if db else api_url()
    if api:
        with _prefect_lock(limit_name(model_name), api):
            yield "prefect"
        return
    key = str(db.resolve()) if db else tracking_uri
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"frugalflow-promote-{digest}-{model_name}.lock"
    if not db:
        log.warning("no Prefect API set: promotions to %s are kept apart on this host only (%s)", redact(tracking_uri), path)
    lock = FileLock(str(path), timeout=LOCK_TIMEOUT_S)
    with lock:
        yield "file"
