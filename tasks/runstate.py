"""Who owns a run, and cleaning up after owners that were killed (SIGKILL, OOM killer, pre-emption).

Every MLflow run frugalflow opens is tagged with the host, pid and pid start time of the process
that opened it (`process_tags`). `close_orphans` closes as FAILED, with the tag
`frugalflow.failure` saying why, every RUNNING run of this host whose process is gone, and tags
the model versions such a run registered. `adopt_children` marks this process as the owner of
every process it starts (environment variable FRUGALFLOW_OWNER, inherited: Prefect's temporary
API server, DVC stage commands); `stop_orphans` stops processes whose owner is gone.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

OWNER_ENV = "FRUGALFLOW_OWNER"
log = logging.getLogger("frugalflow")


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc does not tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return ""


def me() -> str:
    """`host:pid:start`: this process, unambiguous even after its pid is reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def alive(owner: str) -> bool:
    """Whether the process named by `host:pid:start` still runs (True for other hosts: unknowable)."""
    host, pid, start = (owner.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        pass
    return not start or _start_ticks(int(pid)) in ("", start)


def process_tags() -> dict:
    host, pid, start = me().split(":")
    return {"frugalflow.host": host, "frugalflow.pid": pid, "frugalflow.owner": me()}


def close_failed(client, run_id: str, reason: str) -> None:
    """Close a run as FAILED saying why; never raises (the store may be the thing that failed)."""
    try:
        client.set_tag(run_id, "frugalflow.failure", reason[:4000])
    except Exception as exc:  # noqa: BLE001 - best effort, the original error matters more
        log.warning("could not tag run %s as failed: %s", run_id, exc)
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # noqa: BLE001
        log.warning("could not close run %s as FAILED: %s", run_id, exc)


def close_orphans(client, experiment_ids: list[str]) -> list[str]:
    """Close as FAILED the RUNNING runs of this host whose owning process is gone; returns their ids."""
    host = socket.gethostname()
    closed = []
    runs = client.search_runs(experiment_ids, f"attributes.status = 'RUNNING' and tags.`frugalflow.host` = '{host}'",
                              max_results=1000)
    for run in runs:
        owner = run.data.tags.get("frugalflow.owner", "")
        if not owner or alive(owner):
            continue
        at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        reason = (f"killed: its process {owner} ended without closing the run (SIGKILL, OOM killer or "
                  f"power loss); closed by {me()} at {at}")
        close_failed(client, run.info.run_id, reason)
        for version in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
            client.set_model_version_tag(version.name, version.version, "frugalflow.run_failed", reason[:4000])
        closed.append(run.info.run_id)
        log.warning("closed run %s (%s) as FAILED: %s", run.info.run_id, run.info.run_name, reason)
    return closed


def adopt_children() -> None:
    """Mark processes started from here on (they inherit the environment) as owned by this process."""
    os.environ[OWNER_ENV] = me()


def stop_orphans(grace_s: float = 5.0) -> list[int]:
    """Stop (SIGTERM, then SIGKILL) this host's processes whose FRUGALFLOW_OWNER is gone; returns pids."""
    victims = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        owner = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(OWNER_ENV.encode() + b"=")), None)
        if owner and not alive(owner):
            victims.append(int(entry.name))
    for pid in victims:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for pid in victims:
        while time.monotonic() < deadline and alive(f"{socket.gethostname()}:{pid}:"):
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        log.warning("stopped process %d left behind by a killed frugalflow run", pid)
    return victims
