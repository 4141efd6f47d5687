"""Stage 3 of a cross-lingual run: every language's direction on every language's test prompts (the generation and
first-token scores of :mod:`.transfer`, the diagonal from each language's own run), judged into the matrices of
``transfer.json``; a change of the phrase lists alone re-judges the saved completions.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import io
from ..batching import console
from ..config import digest
from ..errors import NoDirectionError
from .inputs import KINDS, content_sha, direction_sha, own_completions_sha
from .language_stage import LanguageStage


class TransferStage(LanguageStage):
    """The transfer stage: :meth:`transfer`."""

    def _transfer_digest(self, judging: bool = True) -> str:
        """What the transfer reads; ``judging=False`` leaves out the phrase lists, which only the judging reads (a
        changed list re-judges the saved completions instead of generating them again)."""
        def tests(lang):
            return content_sha({k: self.prompt_sets[lang][k]["test"] for k in KINDS})

        sources = self.sources()
        inputs = {lang: {"direction": direction_sha(self.dir / lang / "direction.safetensors") if lang in sources
                         else None,
                         "own_completions": own_completions_sha(self.dir / lang), "test_prompts": tests(lang),
                         "refusal_tokens": self.language_config(lang).refusal_tokens,
                         **({"phrases": content_sha(self.phrases[lang]["phrases"])} if judging else {})}
                  for lang in self.languages}
        g = self.cfg.generate
        return digest({"stage": "transfer" if judging else "transfer-generation", "languages": self.languages,
                       "inputs": inputs, "max_new_tokens": g.max_new_tokens, "system_prompt": self.cfg.system_prompt})

    def transfer(self) -> dict:
        """Every language's direction on every language's test prompts; writes ``transfer.json`` and
        ``transfer_completions.json``. Returns ``transfer.json``. When only the phrase lists changed since it
        finished, the saved completions are judged again (no model, no generation)."""
        from ..directions.base import Direction
        from ..scoring.refusal import refusal_token_ids
        from .transfer import generate_transfer, score_transfer

        path, done_path = self.dir / "transfer.json", self.dir / "transfer.done.json"
        dig, gen_dig = self._transfer_digest(), self._transfer_digest(judging=False)
        if self._done(done_path, dig):
            console.print("[dim]transfer: finished earlier, skipped[/]")
            return io.read_json(path)
        if self._rejudgeable(done_path, gen_dig):
            return self._rejudge(dig, gen_dig)
        console.rule("[bold]transfer")
        started = time.perf_counter()
        langs = self.languages
        sources = self.sources()
        if not sources:
            raise NoDirectionError("No language has a refusal direction, so there is nothing to transfer.",
                                   "Check each language's summary.json (no_direction) and the selection filters.")
        dirs = {lang: Direction.load(self.dir / lang / "direction.safetensors") for lang in sources}
        tests = {lang: {k: self.prompt_sets[lang][k]["test"] for k in KINDS} for lang in langs}  # = splits.json's
        harmful = {lang: self.base.prompts(tests[lang]["harmful"]) for lang in langs}
        harmless = {lang: self.base.prompts(tests[lang]["harmless"]) for lang in langs}

        partial_path = self.dir / "transfer.partial.json"
        partial = io.read_json(partial_path) if partial_path.exists() else {}
        saved = {int(k): v for k, v in partial.get("rows", {}).items()} if partial.get("digest") == gen_dig else {}
        if saved:
            console.print(f"Resuming the transfer generation: {len(saved)} completions were saved earlier")

        def save(rows, texts):
            saved.update(zip(rows, texts))
            io.write_json(partial_path, {"digest": gen_dig, "rows": {str(k): v for k, v in saved.items()}})

        g = self.cfg.generate
        comps = generate_transfer(self.base.model, self.base.tokenizer, langs, dirs, harmful, harmless,
                                  max_new_tokens=g.max_new_tokens, batch_size=self.base.generate_batch_size,
                                  static_cache=g.static_cache, skip={(lang, lang) for lang in langs}, done=saved,
                                  on_batch=save)
        n_generated = len(comps)
        rids = {lang: refusal_token_ids(self.base.tokenizer, self.language_config(lang).refusal_tokens)
                for lang in langs}
        scores = score_transfer(self.base.model, self.base.tokenizer, langs, dirs, harmful, harmless, rids,
                                batch_size=self.base.score_batch_size)
        out = self._judge_transfer(comps, scores, {
            "languages": langs, "sources": sources,
            "no_direction": [lang for lang in langs if lang not in sources],
            "rows": "source language (whose direction is applied; null rows: no direction)",
            "columns": "target language (whose test prompts are used)",
            "n_test": {lang: {"harmful": len(harmful[lang]), "harmless": len(harmless[lang])} for lang in langs},
            "directions": {lang: {"layer": d.layer, "pos": d.pos} for lang, d in dirs.items()},
            "generation": {"rows_generated": n_generated, "generate_calls": 1 if n_generated else 0,
                           "max_new_tokens": g.max_new_tokens,
                           "diagonal": "each language's own run (<lang>/completions.json: ablation, actadd)"}})
        partial_path.unlink(missing_ok=True)
        self._finish(done_path, "transfer", dig, time.perf_counter() - started,
                     ["transfer.json", "transfer_completions.json"], {"generation_digest": gen_dig})
        return out

    def _rejudgeable(self, done_path: Path, gen_dig: str) -> bool:
        return (not self.force and done_path.is_file() and (self.dir / "transfer.json").is_file()
                and (self.dir / "transfer_completions.json").is_file()
                and io.read_json(done_path).get("generation_digest") == gen_dig)

    def _rejudge(self, dig: str, gen_dig: str) -> dict:
        """The finished transfer's completions judged with the current phrase lists; its first-token scores kept."""
        from .transfer import saved_completions

        started = time.perf_counter()
        old = io.read_json(self.dir / "transfer.json")
        comps = saved_completions(io.read_json(self.dir / "transfer_completions.json"))
        scores = {k: old[k] for k in ("ablation_kl", "ablation_refusal_score", "addition_refusal_score")}
        scores["baseline_scores"] = {lang: {k: v for k, v in b.items() if k.endswith("_refusal_score")}
                                     for lang, b in old["baseline"].items()}
        keep = ("languages", "sources", "no_direction", "rows", "columns", "n_test", "directions", "generation")
        out = self._judge_transfer(comps, scores, {k: old[k] for k in keep})
        console.print("[dim]transfer: phrase lists changed since it finished; its completions judged again[/]")
        self._finish(self.dir / "transfer.done.json", "transfer", dig, time.perf_counter() - started,
                     ["transfer.json", "transfer_completions.json"], {"generation_digest": gen_dig, "rejudged": True})
        return out

    def _judge_transfer(self, comps: dict, scores: dict, head: dict) -> dict:
        """``transfer.json`` from the generated completions (plus each language's own run as the diagonal) and the
        first-token scores; writes it and ``transfer_completions.json``."""
        from .transfer import TRANSFER_METRICS, transfer_matrices

        langs = self.languages
        for lang in head["sources"]:  # the diagonal: each language's own run
            own = io.read_json(self.dir / lang / "completions.json")
            for kind, cond in (("harmful", "ablation"), ("harmless", "actadd")):
                for i, r in enumerate(own[kind][cond]):
                    comps[(kind, lang, lang, i)] = r["completion"]
        confidence = {lang: self.phrases[lang]["confidence"] for lang in langs}
        mats, judged = transfer_matrices(langs, comps, {lang: self.phrases[lang]["phrases"] for lang in langs},
                                         confidence)
        baseline = {}
        own_baseline = mats.pop("baseline_rows")  # languages without a direction: baseline rows of this generation
        for lang in langs:
            if lang in own_baseline:
                baseline[lang] = {**own_baseline[lang], **scores["baseline_scores"][lang]}
                continue
            res = io.read_json(self.dir / lang / "summary.json")["results"]
            baseline[lang] = {"harmful_non_refusal": {**res["harmful"]["baseline"]["non_refusal"],
                                                      "judgement_confidence": confidence[lang]},
                              "harmless_refusal": {**res["harmless"]["baseline"]["refusal"],
                                                   "judgement_confidence": confidence[lang]},
                              **scores["baseline_scores"][lang]}
        low = [lang for lang in langs if confidence[lang] == "low"]
        warnings = [f"Columns {', '.join(low)}: refusals judged with low-confidence phrase lists; their refusal rates "
                    "are lower bounds and non-refusal rates upper bounds."] if low else []
        for w in warnings:
            self._warn(w)
        out = {
            **{k: v for k, v in head.items() if k != "generation"},
            **mats,
            "ablation_kl": scores["ablation_kl"], "ablation_refusal_score": scores["ablation_refusal_score"],
            "addition_refusal_score": scores["addition_refusal_score"], "baseline": baseline,
            "judgement_confidence": confidence, "warnings": warnings, "generation": head["generation"],
            "metrics": TRANSFER_METRICS}
        io.write_json(self.dir / "transfer_completions.json", judged)
        io.write_json(self.dir / "transfer.json", out)
        return out
