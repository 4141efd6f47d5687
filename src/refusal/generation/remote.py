"""Generation through an existing engine: greedy completions from an OpenAI-compatible server (vLLM, SGLang,
llama.cpp's server, ...), for the conditions that are pure weights.

A condition with no interventions is the model's own weights, so any engine that serves those weights can decode it;
vLLM with tensor parallelism is what decodes a 70B model in reasonable time. Hook-based conditions stay local. The
run's ``generate`` stage (``generate.backend: openai``) uses this module as follows:

* :meth:`CompletionServer.models` reads ``GET /v1/models`` and :func:`check_served_model` compares the served
  model's ``id`` and ``root`` (and its ``revision`` where a server gives one) with the run's model: a mismatch, or a
  LoRA adapter served in place of the run's own weights, is a :class:`~refusal.errors.RefusalError` before any
  prompt is sent, unless ``force`` (the record then says the check was overridden and why it failed).
* :meth:`CompletionServer.complete` posts the prompts, already templated by the run, to ``POST /v1/completions``
  (so the server applies no second chat template), several per request, with ``temperature: 0`` and the run's
  token budget. By default the prompts go as token ids, the very tokens local decoding would read (no second BOS
  from the server's tokenizer); ``prompt_format="text"`` sends the text instead, for servers that take only text.
  The answers are matched to prompts by ``choices[i].index``; each finished request is handed to ``on_batch``, so a
  killed run keeps every finished request and resumes from there.

Timeouts, connection errors, 408, 409, 425, 429 and 5xx answers are retried with exponential backoff (or the
server's ``Retry-After``); 401/403 and other 4xx answers stop with a :class:`RefusalError` that names the fix. The
API key is read from the environment variable whose NAME is configured (never the key itself), sent only in the
``Authorization`` header, and masked in any error text. Only the standard library is used (``urllib``).

The first-token refusal score cannot come from a server that returns text: the server's rows have
``refusal_score: None``, and the run's record says so.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..endpoints import RETRY_STATUS as _RETRY_STATUS
from ..endpoints import RetriesExhausted, Retryable, retrying
from ..endpoints import Secret as _Secret
from ..endpoints import check_env_name as _check_env_name
from ..endpoints import check_url as _check_url
from ..endpoints import retry_after as _retry_after
from ..endpoints import snippet as _snippet
from ..errors import RefusalError

if TYPE_CHECKING:
    from ..config.sections import OpenAIGenerateConfig
    from ..models.loading import ModelSource

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("tokens", "text")
REFUSAL_SCORE_NOTE = ("None for the rows the server decoded: the refusal score is read from the first-token logits, "
                      "and the server returns text")


def base_url(url: str) -> str:
    """``http://host:port/v1`` from a base URL (``http://host:port``, ``.../v1``, or an endpoint under it)."""
    u = url.rstrip("/")
    for tail in ("/chat/completions", "/completions", "/models"):
        if u.endswith(tail):
            u = u[: -len(tail)]
            break
    return u if re.search(r"/v\d+[a-z]*$", u) else u + "/v1"


def public_url(url: str) -> str:
    """The URL without user:password, for records and messages."""
    p = urllib.parse.urlparse(url)
    if p.username is None and p.password is None:
        return url
    host = p.hostname or ""
    return urllib.parse.urlunparse(p._replace(netloc=host + (f":{p.port}" if p.port else "")))


def read_key(env: str) -> str:
    """The API key in the environment variable ``env`` (its name is what the config holds)."""
    import os

    complaint = _check_env_name(env)
    if complaint:
        raise RefusalError(f"generate.openai.api_key_env {complaint}.",
                           "Put the key in an environment variable and give its name, e.g. OPENAI_API_KEY.")
    value = os.environ.get(env, "").strip()
    if not value:
        raise RefusalError(f"The environment variable {env} (generate.openai.api_key_env) is not set or empty.",
                           f"Export {env} with the server's API key, or set api_key_env: null for a server without "
                           "auth.")
    return value


@dataclass
class ServedModel:
    """One entry of ``GET /v1/models``: vLLM gives a base model ``id`` (its served name) and ``root`` (the path or
    hub id it loaded), and a LoRA adapter ``root`` (the adapter's folder) and ``parent`` (the base's served name)."""

    id: str
    root: str | None = None
    parent: str | None = None
    revision: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> ServedModel:
        def text(k: str) -> str | None:
            v = d.get(k)
            return v if isinstance(v, str) and v else None

        return cls(str(d["id"]), text("root"), text("parent"), text("revision"),
                   {k: d[k] for k in ("max_model_len", "owned_by") if k in d})

    def to_json(self) -> dict:
        return {"id": self.id, "root": self.root, "parent": self.parent, "revision": self.revision, **self.extra}


def _norm(name: str) -> str:
    return name.strip().rstrip("/").lower()


def _is_path(name: str) -> bool:
    return name.startswith(("/", "~", "./", "../")) or "\\" in name or bool(re.match(r"^[A-Za-z]:", name))


def _revision(identity: str | None) -> str | None:
    """The commit of a hub identity (``hub:ID@COMMIT``)."""
    if identity and identity.startswith("hub:") and "@" in identity:
        rev = identity.rsplit("@", 1)[1]
        return None if rev == "unknown-revision" else rev
    return None


def match_names(served: Sequence[str], run: Sequence[str]) -> str | None:
    """How a served model's names (id, root) match the run's model names (spec, path, hub id), or None.

    Equal names (case and trailing slashes aside) match; so do a path and a name with the same last component
    (``/models/Qwen2.5-7B-Instruct`` and ``Qwen/Qwen2.5-7B-Instruct``: one machine's copy of the hub model). Two hub
    ids of different organisations do not (``Qwen/X`` and ``someone/X`` are different weights)."""
    run_n = {_norm(r): r for r in run if r}
    for s in served:
        if s and _norm(s) in run_n:
            return f"'{s}' is the run's model '{run_n[_norm(s)]}'"
    for s in served:
        for r in run:
            if s and r and (_is_path(s) or _is_path(r)) and _norm(s).rsplit("/", 1)[-1] == _norm(r).rsplit("/", 1)[-1]:
                return f"'{s}' and the run's model '{r}' have the same last path component"
    return None


def check_served_model(served: Sequence[ServedModel], want: str | None, run_names: Sequence[str],
                       identity: str | None, *, force: bool = False, url: str = "the server") -> tuple[str, dict]:
    """The model name to request and the record of the check: the served model ``want`` (None: the only base model
    served) must be the run's model, by name (:func:`match_names`) and, where the server reports one, revision.

    A name the server does not serve is always refused (every request would fail); a mismatch or an adapter served
    in place of the run's weights is refused unless ``force``, and then recorded as overridden."""
    ids = [m.id for m in served]
    listed = ", ".join(f"'{m.id}'" + (f" (adapter on '{m.parent}')" if m.parent else "") for m in served) or "none"
    if want is None:
        bases = [m for m in served if m.parent is None]
        if len(bases) != 1:
            raise RefusalError(f"generate.openai.model is not set and {url} serves {len(bases)} base models "
                               f"({listed}).", "Set generate.openai.model to the name of the run's model there.")
        entry = bases[0]
    elif want not in ids:
        raise RefusalError(f"{url} does not serve a model named '{want}' (it serves {listed}).",
                           "Set generate.openai.model to one of those names (vllm serve names a model by its path or "
                           "hub id, or by --served-model-name).")
    else:
        entry = served[ids.index(want)]
    run_names = list(run_names) or ["(unnamed)"]
    record = {"served": entry.to_json(), "run_model": {"names": run_names, "identity": identity}, "forced": False}
    problem = None
    how = match_names([entry.id, entry.root or ""], run_names)
    if entry.parent is not None:
        problem = (f"'{entry.id}' is a LoRA adapter ({entry.root}) on '{entry.parent}', not the run's own weights: "
                   "the baseline conditions would hold the adapter's completions")
    elif how is None:
        problem = (f"the served model '{entry.id}'" + (f" (loaded from {entry.root})" if entry.root and
                                                       entry.root != entry.id else "")
                   + f" is not the run's model {run_names[0]!r}" + (f" ({identity})" if identity else ""))
    else:
        want_rev, got_rev = _revision(identity), entry.revision
        if want_rev and got_rev and not (want_rev.startswith(got_rev) or got_rev.startswith(want_rev)):
            problem = f"the served model '{entry.id}' is at revision {got_rev}, the run's model at {want_rev}"
        record["match"] = how
        record["revision"] = "compared" if want_rev and got_rev else "not compared (" + (
            "the server reports none" if want_rev else "the run's model has no hub revision") + "): names only"
    if problem:
        if not force:
            raise RefusalError(
                f"Refusing to generate on {url}: {problem}.",
                f"Serve the run's model (e.g. vllm serve {run_names[0]}) and set generate.openai.model to its "
                "served name; if the server holds the same weights under another name, set "
                "generate.openai.force_model: true (the run records the override).")
        log.warning("generation server %s: %s (forced by generate.openai.force_model)", url, problem)
        record.update(forced=True, mismatch=problem)
    return entry.id, record


def run_model_names(spec: str, source: ModelSource | None = None) -> list[str]:
    """The names the run's model goes by: its spec first, then the resolved path or hub id (a
    :class:`~refusal.models.loading.ModelSource`), and a local folder's own ``_name_or_path``."""
    names = [spec]
    if source is not None:
        names += [source.spec, source.path]
        if source.kind == "folder":
            try:
                cfg = json.loads((Path(source.path) / "config.json").read_text("utf-8"))
                if isinstance(cfg.get("_name_or_path"), str) and cfg["_name_or_path"]:
                    names.append(cfg["_name_or_path"])
            except (OSError, ValueError):
                pass
    return list(dict.fromkeys(n for n in names if n))




class CompletionServer:
    """An OpenAI-compatible server's ``/v1/models`` and ``/v1/completions``, with retries and a masked key.

    ``batch_size``: prompts per request; ``concurrency``: requests in flight; ``retries``: attempts after the first
    (``backoff * 2**attempt`` seconds apart, at most 60 s, or longer if the server's ``Retry-After`` says so)."""

    def __init__(self, url: str, *, api_key_env: str | None = None, timeout: float = 600.0, retries: int = 5,
                 backoff: float = 1.0, concurrency: int = 8, batch_size: int = 16, prompt_format: str = "tokens"):
        complaint = _check_url(url)
        if complaint:
            raise RefusalError(f"generate.openai.url {url!r} {complaint}.", "Fix generate.openai.url.")
        if prompt_format not in PROMPT_FORMATS:
            raise RefusalError(f"generate.openai.prompt_format must be one of {', '.join(PROMPT_FORMATS)} (got "
                               f"{prompt_format!r}).", "tokens: the run's token ids (exact); text: the templated text.")
        self.url = base_url(url)
        self.shown = public_url(self.url)
        self.api_key_env = api_key_env
        self._key = _Secret(read_key(api_key_env)) if api_key_env else None
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.concurrency, self.batch_size, self.prompt_format = int(concurrency), int(batch_size), prompt_format
        self._opener = urllib.request.build_opener()
        self._lock = threading.Lock()
        self.requests = 0  # completion requests answered
        self.retried = 0  # attempts that failed and were tried again

    # ---- HTTP ----------------------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._key is None or not self._key.reveal():
            return text
        return text.replace(self._key.reveal(), "***")

    def _attempt(self, path: str, body: dict | None) -> dict:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._key is not None:
            headers["Authorization"] = "Bearer " + self._key.reveal()
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, headers=headers,
                                     method="GET" if body is None else "POST")
        where = f"{self.shown}{path}"
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                payload = resp.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            detail = self._scrub(_snippet(exc))
            if exc.code in (401, 403):
                who = f"the key in ${self.api_key_env}" if self.api_key_env else "a request without a key"
                raise RefusalError(f"The generation server {where} refused {who} (HTTP {exc.code}{detail}).",
                                   "Check the key, and generate.openai.api_key_env (the NAME of the variable that "
                                   "holds it).") from None
            if exc.code in _RETRY_STATUS:
                raise Retryable(f"HTTP {exc.code}{detail}", _retry_after(exc)) from None
            raise RefusalError(f"The generation server {where} answered HTTP {exc.code}{detail}.",
                               "Check generate.openai (model name, prompt_format: text for a server that takes no "
                               "token ids) and the server's own log.") from None
        except TimeoutError:
            raise Retryable(f"timed out after {self.timeout:g} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise Retryable(f"timed out after {self.timeout:g} s") from None
            raise Retryable(f"cannot reach the server ({exc.reason})") from None
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            raise Retryable(f"connection failed ({exc.__class__.__name__}: {exc})") from None
        try:
            obj = json.loads(payload)
        except ValueError:
            raise Retryable(f"the answer is not JSON: {self._scrub(payload[:200])!r}") from None
        if not isinstance(obj, dict):
            raise Retryable(f"the answer is not a JSON object: {self._scrub(payload[:200])!r}")
        return obj

    def call(self, path: str, body: dict | None = None) -> dict:
        """``GET`` (no body) or ``POST`` ``path`` under the base URL, retried as the module docs say."""
        def told(error: str, n: int, delay: float) -> None:
            with self._lock:
                self.retried += 1
            log.warning("generation server %s%s: %s; retry %d of %d in %.2f s", self.shown, path, error, n,
                        self.retries, delay)

        try:
            return retrying(lambda: self._attempt(path, body), retries=self.retries, backoff=self.backoff,
                            describe=self._scrub, on_retry=told)
        except RetriesExhausted as exc:
            error = str(exc)
        raise RefusalError(
            f"The generation server {self.shown}{path} failed {self.retries + 1} time(s): {error}.",
            "Check that it runs (curl " + self.shown + "/models) and can take the load (lower "
            "generate.openai.concurrency or batch_size, raise timeout); finished batches are saved, and the same "
            "command resumes from them.")

    # ---- models and completions ----------------------------------------------------------------------------------

    def models(self) -> list[ServedModel]:
        """What the server serves (``GET /v1/models``)."""
        data = self.call("/models")
        try:
            return [ServedModel.from_json(m) for m in data["data"]]
        except (KeyError, TypeError):
            raise RefusalError(f"{self.shown}/models did not answer an OpenAI model list ({str(data)[:200]}).",
                               "Point generate.openai.url at an OpenAI-compatible server (e.g. http://host:8000/v1)."
                               ) from None

    def _complete_one(self, model: str, prompts: list, max_tokens: int, extra: dict) -> list[str]:
        body = {"model": model, "prompt": prompts, "max_tokens": int(max_tokens), "temperature": 0, **extra}
        data = self.call("/completions", body)
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise RefusalError(f"{self.shown}/completions answered {len(choices) if isinstance(choices, list) else 0} "
                               f"choices for {len(prompts)} prompts ({self._scrub(str(data)[:200])}).",
                               "Use a server whose completions endpoint takes a list of prompts (vLLM does), or set "
                               "generate.openai.batch_size: 1.")
        out: list[str | None] = [None] * len(prompts)
        indexed = all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices)
        for k, c in enumerate(choices):
            i = c["index"] if indexed else k
            text = c.get("text") if isinstance(c, dict) else None
            if not 0 <= i < len(prompts) or out[i] is not None or not isinstance(text, str):
                raise RefusalError(f"{self.shown}/completions answered a malformed choice ({str(c)[:200]}).",
                                   "Use an OpenAI-compatible completions endpoint (choices[i].index and .text).")
            out[i] = text.strip()  # as local decoding strips its text
        with self._lock:
            self.requests += 1
        return out  # type: ignore[return-value]

    def complete(self, model: str, prompts: Mapping[int, str | list[int]] | Sequence[str | list[int]],
                 rows: Sequence[int], *, max_tokens: int,
                 stop_token_ids: Sequence[int] | None = None, stop: Sequence[str] | None = None,
                 on_batch: Callable[[list[int], list[str], list[None]], None] | None = None,
                 description: str = "Generating on the server") -> dict[int, str]:
        """Greedy completions of ``prompts[i]`` for each ``i`` in ``rows`` (token id lists or templated text),
        ``batch_size`` per request and ``concurrency`` requests in flight; ``on_batch(rows, texts, [None, ...])``
        is called in this thread after each request (refusal scores: none from a server)."""
        from ..batching import progress

        extra: dict = {}
        if stop_token_ids:
            extra["stop_token_ids"] = [int(t) for t in stop_token_ids]
        if stop:
            extra["stop"] = list(stop)
        rows = list(rows)
        chunks = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        out: dict[int, str] = {}
        if not chunks:
            return out
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks)), thread_name_prefix="generate")
        try:
            pending = {pool.submit(self._complete_one, model, [prompts[i] for i in ch], max_tokens, extra): ch
                       for ch in chunks}
            with progress(description, len(rows)) as advance:
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        ch = pending.pop(f)
                        texts = f.result()  # a RefusalError stops here; the batches saved so far stay
                        out.update(zip(ch, texts))
                        if on_batch is not None:
                            on_batch(list(ch), texts, [None] * len(ch))
                        advance(len(ch))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return out

    def __repr__(self) -> str:
        return f"<CompletionServer {self.shown} (key from ${self.api_key_env})>"


def generate_on_server(o: OpenAIGenerateConfig, prompts: Mapping[int, str] | Sequence[str], rows: Sequence[int],
                       budgets: Mapping[int, int], *, tokenizer: Any, run_names: Sequence[str], identity: str | None,
                       stop_token_ids: Sequence[int] | None, on_batch: Callable, record: dict) -> dict:
    """A run's server rows: check the served model, then decode ``rows`` (``budgets[i]`` new tokens each) on the
    server of ``o`` (a :class:`~refusal.config.OpenAIGenerateConfig`), each request's texts to ``on_batch``.

    ``record`` (the run's record of the server, kept in the partial file between a kill and the resume) is filled
    in place as soon as the model is checked, before any prompt is sent, and returned."""
    rows = list(rows)
    if not rows:
        return record
    server = CompletionServer(o.url, api_key_env=o.api_key_env, timeout=o.timeout, retries=o.retries,
                              backoff=o.backoff, concurrency=o.concurrency, batch_size=o.batch_size,
                              prompt_format=o.prompt_format)
    name, check = check_served_model(server.models(), o.model, run_names, identity, force=o.force_model,
                                     url=server.shown)
    stops = [int(t) for t in stop_token_ids or ()] if o.stop_token_ids else []
    record.clear()
    record.update({"url": server.shown, "model": name, **check, "prompt_format": o.prompt_format,
                   "stop_token_ids": stops, "temperature": 0, "refusal_score": REFUSAL_SCORE_NOTE})
    if o.prompt_format == "tokens":  # the tokens local decoding reads: no second BOS from the server's tokenizer
        ids = tokenizer([prompts[i] for i in rows], add_special_tokens=False)["input_ids"]
        inputs: dict = {i: list(x) for i, x in zip(rows, ids)}
    else:
        inputs = {i: prompts[i] for i in rows}
    several = len({budgets[i] for i in rows}) > 1
    for budget in sorted({budgets[i] for i in rows}):
        group = [i for i in rows if budgets[i] == budget]
        server.complete(name, inputs, group, max_tokens=budget, stop_token_ids=stops, on_batch=on_batch,
                        description=f"Generating on {server.shown} ({name})" + (f", {budget} tokens" if several
                                                                                 else ""))
    record.update(requests=server.requests, retries=server.retried)
    return record
