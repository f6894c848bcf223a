"""Failures of the services a run talks to (MLflow store or server, S3, Prefect API, the disk),
told apart from bugs: `exit_code_for(exc)` gives the CLI's exit code and a one-line message.

4: the service cannot be reached or refuses (MLflow errors other than "no such thing", among them a
login refused or a permission missing, named with the account; a locked
or unreachable database, S3 errors, Prefect API errors, a full disk or a file-size limit);
2: the request named something the store does not have (unknown run, version, model).
"""
from __future__ import annotations

import errno
import os

from frugalflow.errors import exit_code_of

_DISK = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_BAD_REQUEST = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS")
_REFUSED = {"PERMISSION_DENIED": "{who} lacks the permission this needs (promoting, registering or deleting "
                                 "needs EDIT or MANAGE on the model; docs/security.md)",
            "UNAUTHENTICATED": "{who} did not log in (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
                               "e.g. from the team's client.env)"}


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def exit_code_for(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for a failure that is not a bug; None for a bug (show the traceback)."""
    for link in _chain(exc):
        disk = isinstance(link, OSError) and link.errno in _DISK
        # libraries with native writers (safetensors) report the OS error only in their message
        disk = disk or any(f"os error {n})" in str(link) for n in _DISK)
        if disk:
            where = f" writing {link.filename}" if getattr(link, "filename", None) else ""
            reason = getattr(link, "strerror", None) or str(link)[:300]
            return 4, (f"the disk refused a write{where}: {reason} (disk full or file-size limit); free "
                       "space and rerun, nothing half-written is reused")
    code = exit_code_of(exc)
    if code is not None:
        return code, str(exc)
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if name in ("MlflowException", "RestException") or module.startswith("mlflow"):
        error_code = getattr(exc, "error_code", "")
        if error_code in _BAD_REQUEST:
            return 2, str(exc)
        if error_code in _REFUSED:
            account = os.environ.get("MLFLOW_TRACKING_USERNAME")
            who = f"account {account!r}" if account else "no account (MLFLOW_TRACKING_USERNAME unset)"
            return 4, f"the MLflow server refused the request: {_REFUSED[error_code].format(who=who)} ({error_code})"
        return 4, f"the MLflow tracking store refused the request ({error_code or name}): {str(exc)[:500]}"
    if module.startswith(("sqlalchemy", "sqlite3", "psycopg2")):
        return 4, f"the tracking database refused the request ({name}): {str(exc)[:500]}"
    if module.startswith(("botocore", "boto3", "tasks.storage")):
        return 4, f"the S3 store refused the request ({name}): {str(exc)[:500]}"
    if module.startswith(("httpx", "httpcore", "prefect")) and ("Connect" in name or "HTTP" in name
                                                                or "Timeout" in name):
        return 4, f"the Prefect API refused the request or cannot be reached ({name}): {str(exc)[:500]}"
    return None
