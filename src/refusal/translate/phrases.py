"""The refusal phrase lists shipped per language (``data/builtin/refusal_phrases_<lang>.json``)."""

from __future__ import annotations

import functools
import json
from importlib import resources

from ..errors import RefusalError

# languages with a shipped refusal phrase list (data/builtin/refusal_phrases_<lang>.json)
PHRASE_LANGUAGES = ("en", "fr", "es", "de", "ru", "zh", "th", "sw", "am")


@functools.cache
def _phrases(lang: str) -> dict:
    text = resources.files("refusal").joinpath(f"data/builtin/refusal_phrases_{lang}.json").read_text("utf-8")
    return json.loads(text)


def refusal_phrases(lang: str) -> dict:
    """The shipped refusal phrases for ``lang``: ``{"language", "phrases", "refusal_openings", "confidence",
    "notes"}``. ``phrases`` are substrings of typical refusals (for judging completions); ``refusal_openings`` are the
    first words of a refusal (for deriving refusal tokens). ``confidence`` says how far the list was checked."""
    code = lang.strip().lower().replace("_", "-").split("-")[0]
    if code not in PHRASE_LANGUAGES:
        raise RefusalError(f"No refusal phrase list ships for the language '{lang}'.",
                           f"Use one of {', '.join(PHRASE_LANGUAGES)}, or pass your own phrases.")
    d = _phrases(code)
    return {**d, "phrases": list(d["phrases"]), "refusal_openings": list(d["refusal_openings"])}
