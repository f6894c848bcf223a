"""What went wrong decides the exit code: the library raises these, the CLI maps them.

    BadInput            2  a recipe, an argument or a file the user gave is wrong or missing
    CorruptData         3  stored data is damaged or inconsistent (weights, cache entry, checkpoint, DVC output)
    ServiceUnavailable  4  a service (MLflow, S3, Prefect, PostgreSQL) cannot be reached or refuses
    anything else       1  a bug: the CLI prints the traceback

Each is also the builtin it refines (ValueError, ConnectionError), so older `except ValueError`
callers keep working. Messages name the key, file or service, the value found and what to do.
"""
from __future__ import annotations


class FrugalflowError(Exception):
    """Base of the taxonomy; `exit_code` is what `frugalflow` exits with."""

    exit_code = 1


class BadInput(FrugalflowError, ValueError):
    """The user's recipe, arguments or files: fix the input and rerun."""

    exit_code = 2


class CorruptData(FrugalflowError, ValueError):
    """Stored data fails its checks (checksum, header, shape): it is not used."""

    exit_code = 3


class ServiceUnavailable(FrugalflowError, ConnectionError):
    """A service that cannot be reached or refuses the request."""

    exit_code = 4


EXIT_CODES = {"done": 0, "bug": 1, "bad input": BadInput.exit_code, "corrupt data": CorruptData.exit_code,
              "service unavailable": ServiceUnavailable.exit_code}


def exit_code_of(exc: BaseException) -> int | None:
    """The exit code for an exception of the taxonomy or a builtin that means the same; None: a bug."""
    if isinstance(exc, FrugalflowError):
        return exc.exit_code
    if isinstance(exc, ConnectionError):
        return ServiceUnavailable.exit_code
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                        FileExistsError)):
        return BadInput.exit_code  # a path the user named: missing, unreadable or in the way
    return None
