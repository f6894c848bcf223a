"""Who owns a run, and cleaning up after owners that were killed (SIGKILL, OOM killer, pre-emption).

Every MLflow run frugalflow opens is tagged with the host, pid and pid start time of the process
that opened it (`process_tags`), and while it is open that process refreshes its tag
`frugalflow.heartbeat` (Unix time) every HEARTBEAT_S seconds (`Heartbeat`, one thread per process).
`close_orphans` closes as FAILED, with the tag `frugalflow.failure` saying why, every RUNNING run
of this host whose process is gone and every RUNNING run of another host whose heartbeat is older
than LEASE_S (a killed worker under docker-compose or Kubernetes never comes back under its host
name), and tags the model versions such a run registered. Hosts compare their own clocks with the
heartbeat: keep them in sync (NTP) within a fraction of the lease. `adopt_children` marks this process as the owner of
every process it starts (environment variable FRUGALFLOW_OWNER, inherited: Prefect's temporary
API server, DVC stage commands); `stop_orphans` stops processes whose owner is gone.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

OWNER_ENV = "FRUGALFLOW_OWNER"
HOST_ENV = "FRUGALFLOW_HOST_NAME"  # this host's name in the tags (default: the machine's host name)
HEARTBEAT_S = float(os.environ.get("FRUGALFLOW_HEARTBEAT_S", "30"))
LEASE_S = float(os.environ.get("FRUGALFLOW_LEASE_S", str(4 * HEARTBEAT_S)))
HEARTBEAT_TAG = "frugalflow.heartbeat"
log = logging.getLogger("frugalflow")


def host_name() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc does not tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return ""


def me() -> str:
    """`host:pid:start`: this process, unambiguous even after its pid is reused."""
    return f"{host_name()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def alive(owner: str) -> bool:
    """Whether the process named by `host:pid:start` still runs (True for other hosts: unknowable)."""
    host, pid, start = (owner.split(":") + ["", "", ""])[:3]
    if host != host_name():
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
    return {"frugalflow.host": host, "frugalflow.pid": pid, "frugalflow.owner": me(), HEARTBEAT_TAG: f"{time.time():.0f}"}


class Heartbeat:
    """This process's runs that are open, their heartbeat refreshed by one daemon thread."""

    def __init__(self):
        self.runs: dict[str, str] = {}  # run id -> tracking URI
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, tracking_uri: str, run_id: str) -> None:
        with self.lock:
            self.runs[run_id] = tracking_uri
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="frugalflow-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, run_id: str) -> None:
        with self.lock:
            self.runs.pop(run_id, None)

    def _beat(self) -> None:
        from mlflow import MlflowClient

        clients: dict[str, MlflowClient] = {}
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:
                runs = dict(self.runs)
            for run_id, uri in runs.items():
                try:
                    client = clients.setdefault(uri, MlflowClient(uri))
                    client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
                except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the lease allows several
                    log.warning("heartbeat of run %s not recorded: %s", run_id, exc)


HEARTBEAT = Heartbeat()


def close_failed(client, run_id: str, reason: str) -> None:
    """Close a run as FAILED saying why; never raises (the store may be the thing that failed)."""
    HEARTBEAT.remove(run_id)
    try:
        client.set_tag(run_id, "frugalflow.failure", reason[:4000])
    except Exception as exc:  # noqa: BLE001 - best effort, the original error matters more
        log.warning("could not tag run %s as failed: %s", run_id, exc)
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # noqa: BLE001
        log.warning("could not close run %s as FAILED: %s", run_id, exc)


def why_orphaned(tags: dict, now: float) -> str | None:
    """Why a RUNNING run's owner is gone (None: it may still be running)."""
    owner = tags.get("frugalflow.owner", "")
    if not owner:
        return None
    if owner.split(":")[0] == host_name():
        return None if alive(owner) else (f"killed: its process {owner} ended without closing the run (SIGKILL, "
                                          "OOM killer or power loss)")
    beat = tags.get(HEARTBEAT_TAG)
    if beat is None or now - float(beat) <= LEASE_S:
        return None  # another host's run without heartbeats (older frugalflow) or one still beating
    last = datetime.fromtimestamp(float(beat), timezone.utc).isoformat(timespec="seconds")
    return (f"lost: its process {owner} on another host last beat at {last}, more than {LEASE_S:.0f} s ago "
            "(killed worker, lost host or network)")


def close_orphans(client, experiment_ids: list[str]) -> list[str]:
    """Close as FAILED the RUNNING runs whose owner is gone (this host: the process; another host: its
    heartbeat ran out); returns their ids."""
    closed = []
    now = time.time()
    runs = client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        why = why_orphaned(run.data.tags, now)
        if why is None:
            continue
        at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        reason = f"{why}; closed by {me()} at {at}"
        close_failed(client, run.info.run_id, reason)
        run_id = run.info.run_id  # the versions it created, and those it adopted from a killed run before it
        for version in [*client.search_model_versions(f"run_id = '{run_id}'"),
                        *client.search_model_versions(f"tags.`frugalflow.adopted_by_run` = '{run_id}'")]:
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
        while time.monotonic() < deadline and alive(f"{host_name()}:{pid}:"):
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        log.warning("stopped process %d left behind by a killed frugalflow run", pid)
    return victims
