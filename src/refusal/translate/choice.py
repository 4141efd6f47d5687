"""Which translator a run uses: named in its configuration (``local``, ``google``, ``google:v3``, another model) or
passed as an object; checked before any work, identified for the run's digest, and built (loading a model for a
local one) only when something needs translating."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import RefusalError

if TYPE_CHECKING:
    from .backends import Translator


def check_translator(translator: Any, run_model: str) -> Any:
    """``None`` / ``"local"`` / the run's own model → ``"local"``; ``"google"`` / ``"google:v3"``; another model spec
    (resolved now, so a bad one fails before the first language); or a backend object (``name`` and
    ``translate``)."""
    if translator is None or translator in ("local", run_model):
        return "local"
    if isinstance(translator, str):
        if translator.startswith("google"):
            version = translator.partition(":")[2] or "v2"
            if version not in ("v2", "v3"):
                raise RefusalError(f"Unknown Google translator '{translator}'.", "Use google, google:v2 or google:v3.")
            return translator
        from ..models.loading import resolve_source

        resolve_source(translator)
        return translator
    if not (hasattr(translator, "name") and callable(getattr(translator, "translate", None))):
        raise RefusalError(f"The translator {translator!r} is not a translation backend.",
                           "Pass 'local', 'google', a model spec, or an object with name and translate().")
    return translator


def translator_identity(translator: Any, run_source: Any, trust_remote_code: bool) -> str | None:
    """What changes when the translations would: the backend's name, or a local model's identity and prompt."""
    from ..models.identity import model_identity
    from ..models.loading import resolve_source
    from .backends import PROMPT

    if translator is None:
        return None
    if not isinstance(translator, str):
        return str(translator.name)
    if translator.startswith("google"):
        return translator
    source = run_source if translator == "local" else resolve_source(translator)
    prompt = hashlib.sha256(json.dumps(PROMPT, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"local:{model_identity(source, trust_remote_code)}:prompt-{prompt[:8]}"


def build_translator(translator: Any, run_model: Callable[[], tuple[Any, Any]], *, device: str | None,
                     dtype: str | None, trust_remote_code: bool, batch_size: int) -> Translator:
    """The backend itself; ``run_model()`` gives the run's own ``(model, tokenizer)`` for ``"local"``."""
    from ..batching import console
    from .backends import GoogleTranslator, LocalModelTranslator

    if not isinstance(translator, str):
        return translator
    if translator.startswith("google"):
        return GoogleTranslator(translator.partition(":")[2] or "v2")
    if translator == "local":
        model, tok = run_model()
        return LocalModelTranslator(model, tok, batch_size=batch_size)
    from ..models.loading import load_model

    console.print(f"[bold]Loading[/] the translation model {translator}")
    model, tok = load_model(translator, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return LocalModelTranslator(model, tok, batch_size=batch_size)
