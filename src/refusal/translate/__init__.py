"""Translating prompt sets into other languages: backends, a cache, quality checks, and refusal phrases per language.

Nothing here imports torch at import time: the local-model backend loads generation code when it first translates.
"""

from __future__ import annotations

from .backends import LANGUAGE_NAMES, GoogleTranslator, LocalModelTranslator, Translator, clean_output, language_name
from .cache import TranslationCache
from .checks import ItemCheck, Report, check_translations, chrf, require_quality, script_share
from .phrases import PHRASE_LANGUAGES, refusal_phrases

__all__ = [
    "LANGUAGE_NAMES", "PHRASE_LANGUAGES", "GoogleTranslator", "ItemCheck", "LocalModelTranslator", "Report",
    "TranslationCache", "Translator", "check_translations", "chrf", "clean_output", "language_name",
    "refusal_phrases", "require_quality", "script_share",
]
