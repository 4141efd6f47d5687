"""Stage 1b of a cross-lingual run: refusal openings learned from the model's own contrast
(:mod:`refusal.evaluation.learned`) for the languages that need them, before any language's run reads its refusal
tokens.

``learn_openings`` says which languages: ``missing`` (default: those without a shipped phrase list), ``all`` (every
language, the shipped lists hidden: how the method is evaluated) or ``never`` (the shipped lists, English's where none
ships). A language learns from its own train and val prompts (never its test prompts): their greedy completions at
the run's ``generate.max_new_tokens`` and their first-token distributions. Where a translator was named for the run,
the English phrase list translated into the language is a second source, checked the same way and combined where it
agrees. The learned list replaces the language's phrases (its judge, the transfer's judging) and its refusal tokens
(the per-language filter, the selection's refusal score, the transfer's scores); ``<lang>/openings.json`` holds it
with its evidence and measured agreement, ``<lang>/openings_completions.json`` the completions it was learned from.
A language where nothing passes the checks keeps the list it had, and says so.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import io
from ..batching import console
from ..config import digest
from ..errors import RefusalError
from ..runs.folder import RunFolder
from ..runs.pipeline import Run
from .inputs import content_sha

if TYPE_CHECKING:
    from ..evaluation.learned import LearnedOpenings

LEARN_MODES = ("missing", "all", "never")


def check_learn_mode(mode: str) -> str:
    if mode not in LEARN_MODES:
        raise RefusalError(f"Unknown learn_openings mode '{mode}'.",
                           "Use missing (learn where no list ships), all (learn every language) or never.")
    return mode


def needs_learning(mode: str, lang: str, phrases: dict) -> bool:
    """Whether ``lang`` (whose shipped entry is ``phrases``) learns its openings under ``mode``."""
    if mode == "never":
        return False
    return mode == "all" or phrases["list"] != lang.split("-")[0]


def _train_val(sets: dict) -> dict[str, list[str]]:
    return {k: [r["instruction"] for r in sets[k]["train"] + sets[k]["val"]] for k in ("harmful", "harmless")}


def openings_digest(lang: str, sets: dict, base: Run, translator: Any) -> str:
    """What learning ``lang``'s openings reads: its train and val prompts, the model and how it decodes, the
    learning settings and the translator of the English list (``translator``: None for English)."""
    from ..evaluation.learned import LearnSettings
    from ..models.identity import model_identity
    from ..translate.choice import translator_identity

    cfg = base.cfg
    return digest({"stage": "openings", "language": lang,
                   "prompts": content_sha({k: sets[k]["train"] + sets[k]["val"] for k in ("harmful", "harmless")}),
                   "model": model_identity(base.inputs.source, cfg.trust_remote_code), "dtype": base.dtype,
                   "system_prompt": cfg.system_prompt, "max_new_tokens": cfg.generate.max_new_tokens,
                   "settings": dataclasses.asdict(LearnSettings()),
                   "translator": translator_identity(translator, base.inputs.source, cfg.trust_remote_code)})


def learn_language(lang: str, folder: RunFolder, sets: dict, base: Run, *, translator: Any,
                   translations: Path, force: bool) -> LearnedOpenings:
    """``lang``'s learned openings (:class:`~refusal.evaluation.learned.LearnedOpenings`): read back from
    ``folder/openings.json`` where they were learned for the same inputs, else learned from ``base``'s model on the
    language's train and val prompts (``translator``: translates the English list as a second source, through the
    cache ``translations``)."""
    from ..evaluation.learned import LearnedOpenings, learn_from_model, translated_phrases
    from ..translate.choice import build_translator

    t = translator if lang.split("-")[0] != "en" else None
    dig = openings_digest(lang, sets, base, t)
    if not force and folder.manifest("openings", dig) and folder.file("openings.json").is_file():
        console.print(f"[dim]{lang}: refusal openings learned earlier, read back[/]")
        return folder.load("openings.json", LearnedOpenings.load)
    started = time.perf_counter()
    prompts = _train_val(sets)
    translated = None
    if t is not None:
        from ..translate import TranslationCache

        backend = build_translator(t, lambda: (base.model, base.tokenizer), device=base.device, dtype=base.cfg.dtype,
                                   trust_remote_code=base.cfg.trust_remote_code, batch_size=base.generate_batch_size)
        translated = translated_phrases(backend, lang, TranslationCache(translations))
    console.rule(f"[bold]{lang}: learning refusal openings")
    folder.path.mkdir(parents=True, exist_ok=True)

    def save(hc: list[str], bc: list[str]) -> None:
        io.write_json(folder.file("openings_completions.json"),
                      {kind: [{"instruction": i, "completion": c} for i, c in zip(prompts[kind], comps)]
                       for kind, comps in (("harmful", hc), ("harmless", bc))})

    learned = learn_from_model(
        base.model, base.tokenizer, prompts["harmful"], prompts["harmless"], language=lang,
        template=lambda xs: base.prompts([{"instruction": x} for x in xs]),
        max_new_tokens=base.cfg.generate.max_new_tokens, batch_size=base.generate_batch_size,
        score_batch_size=base.score_batch_size, translated=translated, on_completions=save)
    learned.save(folder.file("openings.json"))
    folder.write_manifest("openings", dig, time.perf_counter() - started,
                          ["openings.json", "openings_completions.json"])
    return learned


def learned_entry(lang: str, before: dict, learned: LearnedOpenings, warn: Callable[[str], None]) -> dict:
    """The language's phrase entry from a learned list (what it had, ``before``, where nothing was learned)."""
    a = learned.agreement
    measured = ("no agreement measured" if not a else
                f"agreement with the refusal score {a['agree']['rate']:.2f} [{a['agree']['low']:.2f}, "
                f"{a['agree']['high']:.2f}] on {a['agree']['n']} rows, kappa "
                f"{'-' if a['kappa'] is None else format(a['kappa'], '.2f')}")
    entry = {"phrases": learned.phrases, "refusal_openings": learned.refusal_openings,
             "confidence": learned.confidence, "list": learned.source, "source": learned.source,
             "agreement": a, "note": f"Learned from the model's completions ({measured}); openings.json holds "
                                     "the evidence."}
    if not learned.phrases:
        warn(f"{lang}: no refusal phrase could be learned ({'; '.join(learned.notes)}); the {before['list']} list "
             "is used.")
        entry.update({k: before[k] for k in ("phrases", "confidence", "list", "note")})
        entry["source"] = "shipped" if before["list"] == lang.split("-")[0] else f"shipped:{before['list']}"
    if not learned.refusal_openings:
        entry["refusal_openings"] = before["refusal_openings"]
    return entry
