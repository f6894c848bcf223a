"""Server processes of team mode: start detached with a log file, wait for health, stop with
their whole process tree, and check that nothing is left (psutil)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil

from tasks.team.config import TeamError


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path, **popen) -> int:
    """Start `cmd` in its own session (it outlives the CLI), output appended to `log`; its pid."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, **popen)
    return proc.pid


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def created(pid: int) -> float | None:
    """When the process started (psutil's create_time): with the pid, who it is."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def same_process(pid: int | None, started: float | None) -> bool:
    """`pid` runs and is the process that started at `started` (not a later one given the same pid,
    e.g. after a reboot); True for a record without a start time (written before they were kept)."""
    if not alive(pid):
        return False
    if started is None:
        return True
    now = created(pid)
    return now is not None and abs(now - started) < 0.05


def tail(log: Path, n: int = 2500) -> str:
    return log.read_text(errors="replace")[-n:] if log.is_file() else "(no log)"


def wait_until(check: Callable[[], bool], pid: int | None, what: str, address: str, log: Path,
               timeout: float) -> float:
    """Poll `check` until true; a clear TeamError (exit 4) with the log's end if the process exits
    or `timeout` passes. Returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except Exception:  # not answering yet
            pass
        if pid is not None and not alive(pid):
            raise TeamError(f"{what} at {address} exited while starting; its log {log} ends:\n{tail(log)}")
        if time.monotonic() - started > timeout:
            raise TeamError(f"{what} at {address} not healthy within {timeout:.0f} s; its log {log} ends:\n{tail(log)}")
        time.sleep(0.5)


def http_ok(url: str, timeout: float = 3) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def family(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (those still running)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def stop_tree(pid: int | None, grace: float = 10) -> list[int]:
    """SIGTERM to the process, its group and its descendants, SIGKILL after `grace` seconds to
    whatever is left. Returns the pids that were signalled."""
    if not pid:
        return []
    procs = family(pid)
    try:
        pgid = os.getpgid(pid)
    except OSError:
        pgid = None
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace)
    for proc in left + family(pid):
        try:
            proc.kill()
        except psutil.Error:
            pass
    if pgid is not None and pgid == pid:  # a session of its own: its leftovers too
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    psutil.wait_procs(procs, timeout=5)
    return [p.pid for p in procs]


def survivors(pids: list[int]) -> list[str]:
    """The given pids still running (zombies count as gone), described for an error message."""
    left = []
    for pid in pids:
        if alive(pid):
            try:
                left.append(f"{pid} ({' '.join(psutil.Process(pid).cmdline()[:4])})")
            except psutil.Error:
                continue
    return left
