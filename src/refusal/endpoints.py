"""What every client of an OpenAI-compatible HTTP endpoint shares (the openai judge, remote generation, the config
checks of both): URL and key-variable checks, which answers to retry and for how long, a key that never shows
itself, and the start of an error body. Standard library only, at the bottom of the package."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

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


class Retryable(Exception):
    """A failed request worth another try (a timeout, a dropped connection, a status in :data:`RETRY_STATUS`), with
    the wait the server asked for, if it did."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RetriesExhausted(Exception):
    """Every attempt failed with :class:`Retryable`; the message is the last error."""


def retrying(attempt: Callable[[], T], *, retries: int, backoff: float, describe: Callable[[str], str] = str,
             on_retry: Callable[[str, int, float], None] | None = None) -> T:
    """``attempt()``, tried again up to ``retries`` times while it raises :class:`Retryable`: after exponential
    backoff (``backoff * 2**n`` seconds), or the server's ``Retry-After`` if longer, never more than
    :data:`MAX_SLEEP`. ``describe`` turns an error into what may be shown (a masked key); ``on_retry(error, n,
    delay)`` hears of each retry. Any other exception passes through; when every attempt failed,
    :class:`RetriesExhausted` carries the last error."""
    error = "no attempt"
    for n in range(retries + 1):
        try:
            return attempt()
        except Retryable as exc:
            error = describe(str(exc))
            if n == retries:
                break
            delay = min(MAX_SLEEP, backoff * 2 ** n)
            if exc.retry_after is not None:
                delay = min(MAX_SLEEP, max(delay, exc.retry_after))
            if on_retry is not None:
                on_retry(error, n + 1, delay)
            time.sleep(delay)
    raise RetriesExhausted(error)
