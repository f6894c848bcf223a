"""Credentials out of text before it is recorded or shown: `scheme://user:secret@host` becomes
`scheme://user:***@host` in recipe params, the recipe artifact, log lines and error messages."""
from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:'\"]*):(?P<secret>[^/@\s'\"]+)@")


def redact(text: str) -> str:
    """`text` with the password of every URL's user-info replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
