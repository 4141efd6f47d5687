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

from .. import io
from ..batching import console
from ..config import digest
from ..errors import RefusalError
from .inputs import content_sha
from .prompt_stage import PromptStage

LEARN_MODES = ("missing", "all", "never")


def check_learn_mode(mode: str) -> str:
    if mode not in LEARN_MODES:
        raise RefusalError(f"Unknown learn_openings mode '{mode}'.",
                           "Use missing (learn where no list ships), all (learn every language) or never.")
    return mode


class OpeningsStage(PromptStage):
    """The openings stage: :meth:`openings` (run once per process, before any language's run)."""

    learn_mode: str
    phrase_translator: object
    _openings_ready: bool

    def needs_learning(self, lang: str) -> bool:
        if self.learn_mode == "never":
            return False
        return self.learn_mode == "all" or self.phrases[lang]["list"] != lang.split("-")[0]

    def _openings_digest(self, lang: str) -> str:
        from ..evaluation.learned import LearnSettings
        from ..models.identity import model_identity
        from ..translate.choice import translator_identity

        sets = self.prompt_sets[lang]
        t = self.phrase_translator if lang.split("-")[0] != "en" else None
        return digest({"stage": "openings", "language": lang,
                       "prompts": content_sha({k: sets[k]["train"] + sets[k]["val"] for k in ("harmful", "harmless")}),
                       "model": model_identity(self.source, self.cfg.trust_remote_code), "dtype": self.base.dtype,
                       "system_prompt": self.cfg.system_prompt, "max_new_tokens": self.cfg.generate.max_new_tokens,
                       "settings": dataclasses.asdict(LearnSettings()),
                       "translator": translator_identity(t, self.source, self.cfg.trust_remote_code)})

    def openings(self) -> dict[str, dict]:
        """Learn (or read back) the refusal openings of every language that needs them; replaces their entries in
        :attr:`phrases`. Returns ``{lang: openings.json}`` for those languages."""
        if getattr(self, "_openings_ready", False):
            return {lang: io.read_json(self.dir / lang / "openings.json") for lang in self.languages
                    if self.needs_learning(lang) and (self.dir / lang / "openings.json").is_file()}
        out = {}
        for lang in self.languages:
            if self.needs_learning(lang):
                out[lang] = self._learn(lang)
        self._openings_ready = True
        return out

    def _learn(self, lang: str) -> dict:
        from ..evaluation.learned import LearnedOpenings, learn_from_model, translated_phrases
        from ..translate.choice import build_translator

        folder = self.dir / lang
        path, done = folder / "openings.json", folder / "openings.done.json"
        dig = self._openings_digest(lang)
        if self._done(done, dig) and path.is_file():
            console.print(f"[dim]{lang}: refusal openings learned earlier, read back[/]")
            learned = LearnedOpenings.load(path)
        else:
            started = time.perf_counter()
            sets = self.prompt_sets[lang]
            harmful = [r["instruction"] for r in sets["harmful"]["train"] + sets["harmful"]["val"]]
            harmless = [r["instruction"] for r in sets["harmless"]["train"] + sets["harmless"]["val"]]
            translated = None
            if self.phrase_translator is not None and lang.split("-")[0] != "en":
                from ..translate import TranslationCache

                backend = build_translator(self.phrase_translator, lambda: (self.base.model, self.base.tokenizer),
                                           device=self.base.device, dtype=self.cfg.dtype,
                                           trust_remote_code=self.cfg.trust_remote_code,
                                           batch_size=self.base.generate_batch_size)
                translated = translated_phrases(backend, lang, TranslationCache(self.dir / "translations.json"))
            console.rule(f"[bold]{lang}: learning refusal openings")
            folder.mkdir(parents=True, exist_ok=True)

            def save(hc, bc):
                io.write_json(folder / "openings_completions.json",
                              {"harmful": [{"instruction": i, "completion": c} for i, c in zip(harmful, hc)],
                               "harmless": [{"instruction": i, "completion": c} for i, c in zip(harmless, bc)]})

            base = self.base
            learned = learn_from_model(
                base.model, base.tokenizer, harmful, harmless, language=lang,
                template=lambda xs: base.prompts([{"instruction": x} for x in xs]),
                max_new_tokens=self.cfg.generate.max_new_tokens, batch_size=base.generate_batch_size,
                score_batch_size=base.score_batch_size, translated=translated, on_completions=save)
            learned.save(path)
            self._finish(done, "openings", dig, time.perf_counter() - started,
                         ["openings.json", "openings_completions.json"])
        self.phrases[lang] = self._use(lang, learned)
        return learned.to_json()

    def _use(self, lang: str, learned) -> dict:
        """The language's phrase entry from a learned list (what it had, where nothing was learned)."""
        before = self.phrases[lang]
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
            self._warn(f"{lang}: no refusal phrase could be learned ({'; '.join(learned.notes)}); the "
                       f"{before['list']} list is used.")
            entry.update({k: before[k] for k in ("phrases", "confidence", "list", "note")})
            entry["source"] = "shipped" if before["list"] == lang.split("-")[0] else f"shipped:{before['list']}"
        if not learned.refusal_openings:
            entry["refusal_openings"] = before["refusal_openings"]
        return entry
