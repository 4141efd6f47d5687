"""A judge behind an OpenAI-compatible HTTP endpoint (``POST {url}/chat/completions``), e.g. vLLM, llama.cpp's
server, Ollama, or a hosted API.

Spec: ``{"type": "openai", "url": "http://localhost:8000/v1", "model": "NAME", "api_key_env": "OPENAI_API_KEY"}``
plus ``rubric`` (``refusal`` / ``safety``, as for the local LLM judge), ``timeout`` (seconds per request),
``retries`` and ``backoff`` (exponential: ``backoff * 2**attempt`` seconds, or the server's ``Retry-After``),
``concurrency`` (requests in flight) and ``max_tokens``.

The API key is read from the environment variable named in the spec. It is sent only in the ``Authorization``
header, never logged, never stored in a judgement, and masked as ``***`` in any error text that might echo it.
Timeouts, connection errors, 408, 429 and 5xx answers are retried; other 4xx answers and malformed bodies mark
the item failed; 401/403 stop the run with a :class:`RefusalError` (every other request would fail the same way).
Only the standard library is used (``urllib``).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from ...config import OpenAIJudgeConfig
from ...endpoints import RETRY_STATUS as _RETRY_STATUS
from ...endpoints import (
    RetriesExhausted,
    Retryable,
    check_env_name,
    check_url,
    retry_after,
    retrying,
    snippet,
)
from ...endpoints import Secret as _Secret
from ...errors import RefusalError
from .base import Item, Judge, Judgement, as_items
from .llm import RUBRICS, parse_rubric_answer, rubric_message

log = logging.getLogger(__name__)


def endpoint_url(url: str) -> str:
    """``.../v1/chat/completions`` from a base URL (``http://host:port``, ``.../v1``, or the full endpoint)."""
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if re.search(r"/v\d+[a-z]*$", u):
        return u + "/chat/completions"
    return u + "/v1/chat/completions"


class _Failed(Exception):
    """A request that failed for good (no retry)."""




class OpenAIJudge(Judge):
    """A rubric judge served over an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    type = "openai"
    SCHEMA = OpenAIJudgeConfig

    def __init__(self, url: str, model: str, *, api_key_env: str | None = None, rubric: str = "refusal",
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, concurrency: int = 4,
                 max_tokens: int = 8):
        if rubric not in RUBRICS:
            raise RefusalError(f"Unknown rubric '{rubric}'.", f"Use one of: {', '.join(RUBRICS)}.")
        complaint = check_url(url)
        if complaint:
            raise RefusalError(f"The judge URL {url!r} {complaint}.", "Fix 'url' in the judge spec.")
        self.url = endpoint_url(url)
        self.model = model
        self.rubric = RUBRICS[rubric]
        self.kind = self.rubric.kind
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.concurrency, self.max_tokens = int(concurrency), int(max_tokens)
        self.api_key_env = api_key_env
        self._key = _Secret(_read_key(api_key_env)) if api_key_env else None
        self.name = f"openai:{model}"
        self._opener = urllib.request.build_opener()

    @classmethod
    def check_spec(cls, spec: Mapping) -> dict:
        opts = super().check_spec(spec)
        if opts["api_key_env"]:
            _read_key(opts["api_key_env"])
        return opts

    # ------------------------------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._key is None or not self._key.reveal():
            return text
        return text.replace(self._key.reveal(), "***")

    def _request(self, item: Item) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": rubric_message(self.rubric, item.prompt, item.completion)}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key is not None:
            headers["Authorization"] = "Bearer " + self._key.reveal()
        req = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                     method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            detail = self._scrub(snippet(exc))
            if exc.code in (401, 403):
                who = f"the key in ${self.api_key_env}" if self.api_key_env else "a request without a key"
                raise RefusalError(
                    f"The judge endpoint {self.url} refused {who} (HTTP {exc.code}{detail}).",
                    "Check the key and api_key_env in the judge spec." if self.api_key_env
                    else "Set api_key_env in the judge spec to the name of the variable that holds the key.",
                ) from None
            if exc.code in _RETRY_STATUS:
                raise Retryable(f"HTTP {exc.code}{detail}", retry_after(exc)) from None
            raise _Failed(f"HTTP {exc.code}{detail}") from None
        except TimeoutError as exc:
            raise Retryable(f"timed out after {self.timeout:g} s ({exc.__class__.__name__})") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise Retryable(f"timed out after {self.timeout:g} s") from None
            raise Retryable(f"cannot reach the server ({reason})") from None
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            raise Retryable(f"connection failed ({exc.__class__.__name__}: {exc})") from None

    def _one(self, item: Item) -> Judgement:
        def told(error: str, n: int, delay: float) -> None:
            log.warning("judge %s: %s; retry %d of %d in %.2f s", self.url, error, n, self.retries, delay)

        try:
            payload = retrying(lambda: self._request(item), retries=self.retries, backoff=self.backoff,
                               describe=self._scrub, on_retry=told)
        except _Failed as exc:
            return Judgement.failure(self._scrub(str(exc)))
        except RetriesExhausted as exc:
            return Judgement.failure(f"{exc} (after {self.retries + 1} attempt{'s' * (self.retries > 0)})")
        return self._parse(payload)

    def _parse(self, payload: str) -> Judgement:
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return Judgement.failure(f"malformed response (not a chat completion): {self._scrub(payload[:200])!r}",
                                     raw=self._scrub(payload[:2000]))
        if not isinstance(content, str):
            return Judgement.failure(f"malformed response: message content is {type(content).__name__}",
                                     raw=self._scrub(payload[:2000]))
        j = parse_rubric_answer(self._scrub(content), self.rubric)
        j.error = None if j.error is None else self._scrub(j.error)
        return j

    def judge(self, items: Sequence) -> list[Judgement]:
        from ...batching import progress

        items = as_items(items)
        if not items:
            return []
        out: list[Judgement | None] = [None] * len(items)
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(items)), thread_name_prefix="judge")
        try:
            futures = {pool.submit(self._one, it): i for i, it in enumerate(items)}
            with progress(f"Judging ({self.name})", len(items)) as advance:
                for f in as_completed(futures):
                    out[futures[f]] = f.result()
                    advance(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return out  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<OpenAIJudge {self.name!r} at {self.url} ({self.kind}; key from ${self.api_key_env})>"


def _read_key(env: str) -> str:
    complaint = check_env_name(env)
    if complaint:
        raise RefusalError(f"api_key_env in the openai judge spec {complaint}.",
                           "Put the key in an environment variable and give its name, e.g. OPENAI_API_KEY.")
    value = os.environ.get(env, "")
    if not value.strip():
        raise RefusalError(f"The environment variable {env} (api_key_env of the openai judge) is not set or empty.",
                           f"Export {env} with the API key, or drop api_key_env for a server without auth.")
    return value.strip()
