"""The MLflow server's accounts (infra/team.yaml `mlflow.auth.accounts`): created, or their passwords
set, by the admin through MLflow's user API. `team up` calls `ensure_accounts`; docker-compose runs
it as a one-shot service:

    MLFLOW_TRACKING_URI=... MLFLOW_ADMIN_PASSWORD=... MLFLOW_MEMBER_PASSWORD=... \\
    MLFLOW_READER_PASSWORD=... python -m tasks.team.accounts

Passwords come from the environment only and are never printed.
"""
from __future__ import annotations

import os
import sys

from tasks.team.config import TeamError, load_spec


def ensure_accounts(uri: str, admin: tuple[str, str], accounts: dict[str, tuple[str, str]],
                    timeout: float = 30) -> None:
    """As `admin`, make each role's (user, password) account exist with that password."""
    import httpx

    api = uri.rstrip("/") + "/api/2.0/mlflow/users"
    with httpx.Client(auth=admin, timeout=timeout) as http:
        for role, (user, password) in accounts.items():
            done = http.post(f"{api}/create", json={"username": user, "password": password})
            if done.status_code != 200 and "already exists" in done.text.lower():
                done = http.patch(f"{api}/update-password", json={"username": user, "password": password})
            if done.status_code != 200:
                raise TeamError(f"MLflow server at {uri}: setting up the {role} account {user!r} failed "
                                f"({done.status_code}: {done.text[:300]})")


def main() -> int:
    auth = load_spec()["mlflow"]["auth"]
    needed = ["MLFLOW_TRACKING_URI", auth["admin"]["password_var"], *(a["password_var"] for a in auth["accounts"].values())]
    missing = [var for var in needed if not os.environ.get(var)]
    if missing:
        print(f"tasks.team.accounts: set {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        ensure_accounts(os.environ["MLFLOW_TRACKING_URI"], (auth["admin"]["user"], os.environ[auth["admin"]["password_var"]]),
                        {role: (a["user"], os.environ[a["password_var"]]) for role, a in auth["accounts"].items()})
    except TeamError as exc:
        print(f"tasks.team.accounts: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"MLflow accounts ready: {', '.join(a['user'] for a in auth['accounts'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
