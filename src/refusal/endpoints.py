"""What every client of an OpenAI-compatible HTTP endpoint shares (the openai judge, remote generation, the config
checks of both): URL and key-variable checks, which answers to retry and for how long, a key that never shows
itself, and the start of an error body. Standard library only, at the bottom of the package."""

from __future__ import annotations

import re
import urllib.error
import urllib.parse

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_SLEEP = 60.0  # seconds: the longest wait before a retry, whatever the server's Retry-After says
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Secret:
    """A string that does not show itself in repr, str or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__


def check_url(url: str) -> str | None:
    """A complaint about ``url`` (not an http(s) URL with a host), or None."""
    p = urllib.parse.urlparse(url)
    if p.scheme not in ("http", "https") or not p.netloc:
        return "must be an http:// or https:// URL such as http://localhost:8000/v1"
    return None


def check_env_name(name: str) -> str | None:
    """A complaint about ``name`` (not the name of an environment variable, e.g. a pasted key), or None."""
    return None if _ENV_NAME.match(name) else "must be the NAME of an environment variable (the key itself never " \
                                              "goes in a spec)"


def snippet(exc: urllib.error.HTTPError) -> str:
    """``": <the first 200 characters of the error body>"``, or ``""``."""
    try:
        body = exc.read().decode("utf-8", errors="replace").strip()
    except Exception:  # a body that cannot be read adds nothing
        body = ""
    return f": {body[:200]}" if body else ""


def retry_after(exc: urllib.error.HTTPError) -> float | None:
    """The server's ``Retry-After`` in seconds, if it gave one as a number."""
    value = exc.headers.get("Retry-After") if exc.headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
