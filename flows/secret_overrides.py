"""Recipe overrides that carry a secret reach the flow through this process's environment, not its
Prefect parameters (which the Prefect server stores and its UI shows).

`-s tracking.uri=http://user:secret@host`, `-s notify.webhook_url=...` or any key named like a
credential (password, secret, token, key): `split` keeps such overrides out of the list passed to the
flow as a parameter and puts them in FRUGALFLOW_SECRET_OVERRIDES; `restore` adds them back where the
flow (and its notification hooks, in the same process) loads its recipe. A deployment run gets its
parameters from the Prefect server: give it secrets through the worker's environment or a file."""
from __future__ import annotations

import json
import os

from frugalflow.redact import redact

ENV = "FRUGALFLOW_SECRET_OVERRIDES"
SECRET_WORDS = ("password", "secret", "token", "webhook_url", "api_key", "access_key")


def is_secret(override: str) -> bool:
    key, _, value = override.partition("=")
    name = key.strip().rsplit(".", 1)[-1].lower()
    return any(word in name for word in SECRET_WORDS) or redact(value) != value


def split(overrides: list[str] | None) -> list[str]:
    """The overrides safe to record; the others are kept for `restore` in this process's environment."""
    overrides = list(overrides or [])
    hidden = [o for o in overrides if is_secret(o)]
    if hidden:
        os.environ[ENV] = json.dumps(hidden)
    else:
        os.environ.pop(ENV, None)
    return [o for o in overrides if not is_secret(o)]


def restore(overrides: list[str] | None) -> list[str]:
    """The flow's overrides with those `split` held back after the recorded ones (once: restoring twice
    adds nothing)."""
    given = list(overrides or [])
    return given + [o for o in json.loads(os.environ.get(ENV) or "[]") if o not in given]
