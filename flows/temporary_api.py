"""Prefect's temporary API server, started in a session of its own.

Without a Prefect server (`PREFECT_API_URL` unset), Prefect starts a temporary API server as a
child of the CLI, in the CLI's process group. A signal to that group (Ctrl-C in a terminal,
`timeout`, a service manager stopping the job) then stops the server at the same moment as the
flow, and the flow spends minutes retrying to report its crash to an API that is gone, then
exits 4 saying the Prefect API cannot be reached. In its own session, the server only hears
from the flow: the flow reports its state, closes its MLflow runs and stops the server at exit
(Prefect's atexit hook). A SIGKILLed CLI leaves the server to the next run (tasks/runstate.py:
it carries FRUGALFLOW_OWNER). This leans on two internals of Prefect 3's `SubprocessASGIServer`
(its per-port instances, its `_run_uvicorn_command`); where they are missing, Prefect's default
stands and a warning says so (tests/test_kill.py then fails on the signal to the group).
"""
from __future__ import annotations

import logging
import subprocess
from unittest import mock


class _OwnSessionPopen:
    """What `subprocess` is to Prefect's server module while it starts the server: the same,
    with every Popen in a new session."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802 - stands in for subprocess.Popen
        return subprocess.Popen(*args, **{**kwargs, "start_new_session": True})


def start_in_own_session() -> None:
    """Make the temporary API server this process will start (if any) run in its own session.
    A no-op with a Prefect API configured, or once a temporary server exists in this process."""
    import prefect.server.api.server as server_module
    from prefect.settings import PREFECT_API_URL

    base = getattr(server_module, "SubprocessASGIServer", None)
    if not (isinstance(getattr(base, "_instances", None), dict) and hasattr(base, "_run_uvicorn_command")):
        logging.getLogger("frugalflow").warning(
            "this Prefect has no SubprocessASGIServer internals we know: its temporary API server stays in this "
            "process group, where Ctrl-C stops it before the flow can record its crash")
        return
    if PREFECT_API_URL.value() or None in base._instances:
        return

    class OwnSessionServer(base):
        def _run_uvicorn_command(self):
            with mock.patch.object(server_module, "subprocess", _OwnSessionPopen()):
                return super()._run_uvicorn_command()

    OwnSessionServer()  # registers itself as the instance Prefect's clients will start and use
