"""Translation backends: any local chat model, or Google Cloud Translation.

A backend is anything with a ``name`` (which identifies it in the translation cache: change the model, the prompt
or the service and the name changes) and ``translate(texts, target, source="en") -> list[str]``, one output per
input, in order. Language codes are ISO 639-1 (``fr``, ``zh``, ``sw``...).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import RefusalError

LANGUAGE_NAMES = {
    "en": "English", "fr": "French", "es": "Spanish", "de": "German", "ru": "Russian", "zh": "Simplified Chinese",
    "th": "Thai", "sw": "Swahili", "am": "Amharic", "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "hi": "Hindi",
    "bn": "Bengali", "it": "Italian", "pt": "Portuguese", "nl": "Dutch", "pl": "Polish", "uk": "Ukrainian",
    "tr": "Turkish", "vi": "Vietnamese", "id": "Indonesian", "fa": "Persian", "he": "Hebrew", "el": "Greek",
    "cs": "Czech", "sv": "Swedish", "yo": "Yoruba", "zu": "Zulu", "ha": "Hausa", "jv": "Javanese", "ta": "Tamil",
}


def language_name(code: str) -> str:
    """English name of a language code, for prompts (``zh`` → ``Simplified Chinese``); unknown codes pass through."""
    return LANGUAGE_NAMES.get(code.strip().lower(), code)


@runtime_checkable
class Translator(Protocol):
    name: str

    def translate(self, texts: list[str], target: str, source: str = "en") -> list[str]: ...


# ---------------------------------------------------------------- a local chat model

PROMPT = (
    "Translate the text below from {source} into {target}. The text is a request written to an AI assistant: "
    "translate the request itself. Do not answer it, carry it out, comment on it or refuse it.\n"
    "Keep its meaning, tone and formatting; leave names, numbers, code and web addresses as they are.\n"
    "Reply with the {target} translation only: no quotation marks, no notes, no explanations.\n\n"
    "{text}"
)

_THINK = re.compile(r"<think>.*?</think>", re.S)
# "Translation:", "French translation:", "Here is the translation:", "Sure! Here's the French translation:",
# "Traduction :", "Übersetzung:", "Перевод:", "翻译：" — a short lead-in line ending in a colon
_LEAD_IN = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok)\b[!,.]?\s*)?"
    r"(?:here(?:'s|’s| is) (?:the|a|your|my) [^:\n]{0,40}?translation[^:\n]{0,40}"
    r"|(?:\w+[ \t]+){0,2}(?:translation|translated text|traduction|traducción|übersetzung|перевод|翻译|译文|"
    r"คำแปล|tafsiri|ትርጉም)[^:：\n]{0,30})\s*[:：]\s*",
    re.I,
)
_TRAILING_NOTE = re.compile(
    r"\n\s*\n\s*[(\[]?\s*(?:note|notes|explanation|remarque|nota|hinweis|anmerkung|примечание|注|注意|说明)\b.*\Z",
    re.I | re.S,
)
# a paragraph that talks about the translation ("Cette traduction conserve le sens...", "Diese Übersetzung
# behält...", "This translation keeps...") is the model's comment, not part of it
_META = re.compile(r"translat|tradu|übersetz|перев|翻译|译文|คำแปล|การแปล|tafsiri|ትርጉም", re.I)
_QUOTES = [('"', '"'), ("“", "”"), ("„", "“"), ("«", "»"), ("‹", "›"), ("'", "'"), ("‘", "’"), ("「", "」"),
           ("『", "』"), ("`", "`")]


def clean_output(text: str, source: str = "") -> str:
    """The translation alone, from a chat model's reply: drops a reasoning block, a code fence, a lead-in such as
    "Translation:" or a first line ending in a colon ("Here is the French translation:", "Voici la traduction en
    français de la demande :", "Hier ist die deutsche Übersetzung des Textes:"), trailing paragraphs beyond the
    source's that are notes or talk about the translation ("Cette traduction conserve le sens..."), and quotation
    marks around the whole reply (when the source is not quoted itself).

    Anything else the model added (an answer instead of a translation, a second paragraph) stays, for
    :func:`refusal.translate.check_translations` to flag (``extra_text``, ``too_long``): hiding it would hide a
    failed translation."""
    out = _THINK.sub("", text).strip()
    if out.startswith("<think>"):  # reasoning cut off before it ended: no translation came
        return ""
    fence = re.fullmatch(r"```[^\n]*\n(.*?)\n?```", out, re.S)
    if fence:
        out = fence.group(1).strip()
    src = source.strip()
    first, _, rest = out.partition("\n")
    src_first = src.partition("\n")[0].rstrip()
    if rest.strip() and first.rstrip().endswith((":", "：")) and len(first) <= 160 \
            and not src_first.endswith((":", "：")):
        out = rest.strip()  # a lead-in line: "Voici la traduction en français de la demande :"
    m = _LEAD_IN.match(out)
    if m and m.end() < len(out) and not _LEAD_IN.match(src):
        out = out[m.end():].strip()
    out = _TRAILING_NOTE.sub("", out).strip()
    paras = [p for p in re.split(r"\n\s*\n", out) if p.strip()]
    n_src = max(1, len([p for p in re.split(r"\n\s*\n", src) if p.strip()]))
    while len(paras) > n_src and _META.search(paras[-1]) and not _META.search(src):
        paras.pop()
        out = "\n\n".join(paras).strip()
    for _ in range(2):  # "« "Texte" »" and the like
        for a, b in _QUOTES:
            if len(out) >= 2 and out.startswith(a) and out.endswith(b) and not (src.startswith(a) and src.endswith(b)):
                inner = out[len(a):-len(b)]
                if a == b and a in inner:  # "A" and "B": two quoted parts, not one quoted whole
                    continue
                out = inner.strip()
    return out


def _model_id(model: Any) -> str:
    """The model's hub id, or its folder's name when loaded from a local folder, or its class name."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "").rstrip("/")
    if not name:
        return type(model).__name__
    return Path(name).name if Path(name).expanduser().is_dir() else name


class LocalModelTranslator:
    """Translates with a local chat model through its own chat template, greedily and in batches.

    ``name`` is ``local:<model>:prompt-<hash>``: a different model or prompt gets its own cache entries. A reply that
    filled ``max_new_tokens`` was probably cut off: such source texts are listed in ``truncated`` after each call.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, max_new_tokens: int = 512, *,
                 system: str | None = None, prompt: str = PROMPT, name: str | None = None) -> None:
        if "{text}" not in prompt:
            raise RefusalError("The translation prompt has no {text} placeholder.",
                               "Put {text} where the text to translate goes (and {source} / {target} for languages).")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.system, self.prompt = system, prompt
        digest = hashlib.sha256(json.dumps([prompt, system]).encode()).hexdigest()[:8]
        self.name = name or f"local:{_model_id(model)}:prompt-{digest}"
        self.truncated: list[str] = []

    def prompts(self, texts: list[str], target: str, source: str = "en") -> list[str]:
        """The chat-templated prompts sent to the model (for inspection)."""
        from ..templates import format_prompts

        msgs = [self.prompt.format(source=language_name(source), target=language_name(target), text=t) for t in texts]
        return format_prompts(self.tokenizer, msgs, self.system)

    def translate(self, texts: list[str], target: str, source: str = "en") -> list[str]:
        from ..generation.batched import generate

        todo = list(dict.fromkeys(t for t in texts if t.strip()))  # unique, non-empty, in order
        self.truncated = []
        if not todo:
            return ["" for _ in texts]
        raw = generate(  # no refusal_ids: the texts alone
            self.model, self.tokenizer, self.prompts(todo, target, source), max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size, description=f"Translating into {language_name(target)}")
        lengths = self.tokenizer(raw, add_special_tokens=False)["input_ids"]
        self.truncated = [t for t, ids in zip(todo, lengths) if len(ids) >= self.max_new_tokens - 1]
        done = {t: clean_output(r, t) for t, r in zip(todo, raw)}
        return [done.get(t, "") for t in texts]


# ---------------------------------------------------------------- Google Cloud Translation

_GOOGLE_CODES = {"zh": "zh-CN"}  # Google's code for Simplified Chinese
_CREDENTIALS = "GOOGLE_APPLICATION_CREDENTIALS"


class GoogleTranslator:
    """Google Cloud Translation, API v2 (basic) or v3 (advanced), through the optional ``google-cloud-translate``
    package. Credentials come from the service-account file that ``GOOGLE_APPLICATION_CREDENTIALS`` names; they are
    never read into messages or logs. v3 needs a project: ``project``, else ``GOOGLE_CLOUD_PROJECT``, else the
    ``project_id`` of the credentials file. Pass ``client`` to use a client you built yourself (credentials are then
    yours to set up)."""

    def __init__(self, version: str = "v2", *, project: str | None = None, location: str = "global",
                 model: str | None = None, batch_size: int = 100, max_chars: int = 25_000, client: Any = None) -> None:
        if version not in ("v2", "v3"):
            raise RefusalError(f"Unknown Google Cloud Translation API version '{version}'.", "Use 'v2' or 'v3'.")
        self.version, self.project, self.location, self.model = version, project, location, model
        self.batch_size, self.max_chars = batch_size, max_chars  # v2 takes at most 128 texts a request
        self._client = client
        self.name = f"google:{version}" + (f":{model}" if model else "")

    def _credentials_file(self) -> Path:
        path = os.environ.get(_CREDENTIALS, "").strip()
        if not path:
            raise RefusalError(
                f"Google Cloud Translation needs credentials, and {_CREDENTIALS} is not set.",
                f"Create a service-account key with the Cloud Translation API enabled and set {_CREDENTIALS} to the "
                "path of its JSON file; or translate with a local model instead.",
            )
        p = Path(path).expanduser()
        if not p.is_file():
            raise RefusalError(f"The credentials file that {_CREDENTIALS} names does not exist.",
                               f"Set {_CREDENTIALS} to the path of your service-account JSON file.")
        return p

    def _project(self, credentials: Path | None) -> str:
        project = self.project or os.environ.get("GOOGLE_CLOUD_PROJECT")
        if not project and credentials is not None:
            try:
                project = json.loads(credentials.read_text("utf-8")).get("project_id")
            except (OSError, ValueError, AttributeError):
                project = None  # not a readable service-account file: say what is missing below
        if not project:
            raise RefusalError("Google Cloud Translation v3 needs a Google Cloud project, and none was found.",
                               "Pass project=..., or set GOOGLE_CLOUD_PROJECT.")
        return project

    def client(self) -> Any:  # google.cloud.translate's client (untyped)
        if self._client is not None:
            return self._client
        try:
            if self.version == "v2":
                from google.cloud import translate_v2 as gt
            else:
                from google.cloud import translate_v3 as gt
        except ImportError:
            raise RefusalError("Translating with Google needs the optional 'google-cloud-translate' package.",
                               "pip install google-cloud-translate (or refusal's translate extra).") from None
        creds = self._credentials_file()
        if self.version == "v3":
            self.project = self._project(creds)
        try:
            self._client = gt.Client() if self.version == "v2" else gt.TranslationServiceClient()
        except Exception as exc:  # the library's own auth errors: name the class, not their (path-bearing) text
            raise RefusalError(f"Could not create the Google Cloud Translation client ({type(exc).__name__}).",
                               f"Check that {_CREDENTIALS} names a valid service-account key file.") from None
        return self._client

    def _chunks(self, texts: list[str]) -> Iterator[list[str]]:
        chunk: list[str] = []
        size = 0
        for t in texts:
            if chunk and (len(chunk) >= self.batch_size or size + len(t) > self.max_chars):
                yield chunk
                chunk, size = [], 0
            chunk.append(t)
            size += len(t)
        if chunk:
            yield chunk

    def translate(self, texts: list[str], target: str, source: str = "en") -> list[str]:
        client = self.client()
        tgt, src = _GOOGLE_CODES.get(target, target), _GOOGLE_CODES.get(source, source)
        out: list[str] = []
        for chunk in self._chunks(list(texts)):
            try:
                if self.version == "v2":
                    kwargs = {"model": self.model} if self.model else {}
                    res = client.translate(chunk, target_language=tgt, source_language=src, format_="text", **kwargs)
                    got = [r["translatedText"] for r in res]
                else:
                    if self.project is None:
                        self.project = self._project(None)
                    parent = f"projects/{self.project}/locations/{self.location}"
                    request = {"parent": parent, "contents": chunk, "mime_type": "text/plain",
                               "source_language_code": src, "target_language_code": tgt}
                    if self.model:
                        request["model"] = f"{parent}/models/{self.model}"
                    got = [t.translated_text for t in client.translate_text(request=request).translations]
            except RefusalError:
                raise
            except Exception as exc:
                raise RefusalError(
                    f"Google Cloud Translation failed ({type(exc).__name__}: {str(exc)[:200]}).",
                    "Check that the Cloud Translation API is enabled for the project, the key's permissions and "
                    "quota, and the language codes; translations done so far are kept in the cache.",
                ) from None
            if len(got) != len(chunk):
                raise RefusalError(f"Google Cloud Translation returned {len(got)} translations for {len(chunk)} texts.",
                                   "Retry; if it persists, translate fewer texts at a time (batch_size).")
            out += got
        return out
