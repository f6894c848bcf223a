"""What the command line sets for Prefect before importing it: a start timeout for Prefect's temporary
API server that a loaded machine meets (180 s, not Prefect's 20), unless the user set one."""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT

SHOW = ("import contextlib\nfrom flows.cli import main\nwith contextlib.suppress(SystemExit):\n"
        "    main(['validate', 'params.yaml'])\n"
        "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as S\nprint('timeout', S.value())\n")


def timeout_seen(**env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    done = subprocess.run([sys.executable, "-c", SHOW], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_temporary_server_start_timeout_default_and_override():
    assert timeout_seen() == "timeout 180"
    assert timeout_seen(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="45") == "timeout 45"
