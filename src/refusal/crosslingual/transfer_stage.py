"""Stage 3 of a cross-lingual run: every language's direction on every language's test prompts (the generation and
first-token scores of :mod:`.transfer`, the diagonal from each language's own run), judged into the matrices of
``transfer.json``; a change of the phrase lists alone re-judges the saved completions. Functions over the languages'
folders (``root/<lang>/``) and the run folder ``root``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from .. import io
from ..batching import console
from ..config import digest
from ..errors import NoDirectionError
from ..runs.folder import RunFolder
from ..runs.pipeline import Run
from .inputs import KINDS, content_sha, direction_sha, own_completions_sha
from .language_stage import Language, language_config, sources

OUTPUTS = ["transfer.json", "transfer_completions.json"]


def transfer_digest(base: Run, langs: Mapping[str, Language], root: RunFolder, judging: bool = True) -> str:
    """What the transfer reads; ``judging=False`` leaves out the phrase lists, which only the judging reads (a
    changed list re-judges the saved completions instead of generating them again)."""
    have = sources(list(langs), root.path)
    inputs = {code: {"direction": direction_sha(root.path / code / "direction.safetensors") if code in have else None,
                     "own_completions": own_completions_sha(root.path / code),
                     "test_prompts": content_sha({k: lang.prompt_sets[k]["test"] for k in KINDS}),
                     "refusal_tokens": language_config(base.cfg, lang, root.path).refusal_tokens,
                     **({"phrases": content_sha(lang.phrases["phrases"])} if judging else {})}
              for code, lang in langs.items()}
    cfg = base.cfg
    return digest({"stage": "transfer" if judging else "transfer-generation", "languages": list(langs),
                   "inputs": inputs, "max_new_tokens": cfg.generate.max_new_tokens, "system_prompt": cfg.system_prompt})


def transfer_stage(base: Run, langs: Mapping[str, Language], root: RunFolder, *, warn: Callable[[str], None],
                   force: bool) -> dict:
    """Every language's direction on every language's test prompts, on ``base``'s model; writes ``transfer.json``
    and ``transfer_completions.json``. Returns ``transfer.json``. When only the phrase lists changed since it
    finished, the saved completions are judged again (no model, no generation)."""
    dig, gen_dig = transfer_digest(base, langs, root), transfer_digest(base, langs, root, judging=False)
    done = None if force else root.manifest("transfer")
    if done and done.get("digest") == dig:
        console.print("[dim]transfer: finished earlier, skipped[/]")
        return root.read_json("transfer.json")
    if done and done.get("generation_digest") == gen_dig and all(root.file(n).is_file() for n in OUTPUTS):
        return rejudge(langs, root, dig, gen_dig, warn)
    console.rule("[bold]transfer")
    started = time.perf_counter()
    comps, scores, head = generate_and_score(base, langs, root, gen_dig)
    out = judge_transfer(langs, root, comps, scores, head, warn)
    root.file("transfer.partial.json").unlink(missing_ok=True)
    root.write_manifest("transfer", dig, time.perf_counter() - started, OUTPUTS, {"generation_digest": gen_dig})
    return out


def generate_and_score(base: Run, langs: Mapping[str, Language], root: RunFolder,
                       gen_dig: str) -> tuple[dict, dict, dict]:
    """The off-diagonal pairs' completions (one batched generation, resumed from ``transfer.partial.json`` when it
    holds ``gen_dig``'s rows) and every pair's first-token scores; returns ``(completions, scores, head)``, ``head``
    being what ``transfer.json`` says of the languages and the generation."""
    from ..directions.base import Direction
    from ..scoring.refusal import refusal_token_ids
    from .transfer import generate_transfer, score_transfer

    codes = list(langs)
    have = sources(codes, root.path)
    if not have:
        raise NoDirectionError("No language has a refusal direction, so there is nothing to transfer.",
                               "Check each language's summary.json (no_direction) and the selection filters.")
    dirs = {c: RunFolder(root.path / c).load("direction.safetensors", Direction.load) for c in have}
    harmful = {c: base.prompts(lang.prompt_sets["harmful"]["test"]) for c, lang in langs.items()}  # = splits.json's
    harmless = {c: base.prompts(lang.prompt_sets["harmless"]["test"]) for c, lang in langs.items()}

    partial_path = root.file("transfer.partial.json")
    partial = io.read_json(partial_path) if partial_path.exists() else {}
    saved = {int(k): v for k, v in partial.get("rows", {}).items()} if partial.get("digest") == gen_dig else {}
    if saved:
        console.print(f"Resuming the transfer generation: {len(saved)} completions were saved earlier")

    def save(rows: list[int], texts: list[str]) -> None:
        saved.update(zip(rows, texts))
        io.write_json(partial_path, {"digest": gen_dig, "rows": {str(k): v for k, v in saved.items()}})

    g = base.cfg.generate
    comps = generate_transfer(base.model, base.tokenizer, codes, dirs, harmful, harmless,
                              max_new_tokens=g.max_new_tokens, batch_size=base.generate_batch_size,
                              static_cache=g.static_cache, skip={(c, c) for c in codes}, done=saved, on_batch=save)
    rids = {c: refusal_token_ids(base.tokenizer, language_config(base.cfg, lang, root.path).refusal_tokens)
            for c, lang in langs.items()}
    scores = score_transfer(base.model, base.tokenizer, codes, dirs, harmful, harmless, rids,
                            batch_size=base.score_batch_size)
    head = {"languages": codes, "sources": have, "no_direction": [c for c in codes if c not in have],
            "rows": "source language (whose direction is applied; null rows: no direction)",
            "columns": "target language (whose test prompts are used)",
            "n_test": {c: {"harmful": len(harmful[c]), "harmless": len(harmless[c])} for c in codes},
            "directions": {c: {"layer": d.layer, "pos": d.pos} for c, d in dirs.items()},
            "generation": {"rows_generated": len(comps), "generate_calls": 1 if comps else 0,
                           "max_new_tokens": g.max_new_tokens,
                           "diagonal": "each language's own run (<lang>/completions.json: ablation, actadd)"}}
    return comps, scores, head


def rejudge(langs: Mapping[str, Language], root: RunFolder, dig: str, gen_dig: str,
            warn: Callable[[str], None]) -> dict:
    """The finished transfer's completions judged with the current phrase lists; its first-token scores kept."""
    from .transfer import saved_completions

    started = time.perf_counter()
    old = root.read_json("transfer.json")
    comps = saved_completions(root.read_json("transfer_completions.json"))
    scores = {k: old[k] for k in ("ablation_kl", "ablation_refusal_score", "addition_refusal_score")}
    scores["baseline_scores"] = {lang: {k: v for k, v in b.items() if k.endswith("_refusal_score")}
                                 for lang, b in old["baseline"].items()}
    keep = ("languages", "sources", "no_direction", "rows", "columns", "n_test", "directions", "generation")
    out = judge_transfer(langs, root, comps, scores, {k: old[k] for k in keep}, warn)
    console.print("[dim]transfer: phrase lists changed since it finished; its completions judged again[/]")
    root.write_manifest("transfer", dig, time.perf_counter() - started, OUTPUTS,
                        {"generation_digest": gen_dig, "rejudged": True})
    return out


def judge_transfer(langs: Mapping[str, Language], root: RunFolder, comps: dict, scores: dict, head: dict,
                   warn: Callable[[str], None]) -> dict:
    """``transfer.json`` from the generated completions (plus each language's own run as the diagonal) and the
    first-token scores; writes it and ``transfer_completions.json``."""
    from .transfer import TRANSFER_METRICS, transfer_matrices

    codes = list(langs)
    for c in head["sources"]:  # the diagonal: each language's own run
        own = RunFolder(root.path / c).read_json("completions.json")
        for kind, cond in (("harmful", "ablation"), ("harmless", "actadd")):
            for i, r in enumerate(own[kind][cond]):
                comps[(kind, c, c, i)] = r["completion"]
    confidence = {c: lang.phrases["confidence"] for c, lang in langs.items()}
    mats, judged = transfer_matrices(codes, comps, {c: lang.phrases["phrases"] for c, lang in langs.items()},
                                     confidence)
    own_baseline = mats.pop("baseline_rows")  # languages without a direction: baseline rows of this generation
    baseline = {c: {**(own_baseline.get(c) or _own_baseline(root, c, confidence[c])), **scores["baseline_scores"][c]}
                for c in codes}
    low = [c for c in codes if confidence[c] == "low"]
    warnings = [f"Columns {', '.join(low)}: refusals judged with low-confidence phrase lists; their refusal rates "
                "are lower bounds and non-refusal rates upper bounds."] if low else []
    for w in warnings:
        warn(w)
    out = {
        **{k: v for k, v in head.items() if k != "generation"},
        **mats,
        "ablation_kl": scores["ablation_kl"], "ablation_refusal_score": scores["ablation_refusal_score"],
        "addition_refusal_score": scores["addition_refusal_score"], "baseline": baseline,
        "judgement_confidence": confidence, "warnings": warnings, "generation": head["generation"],
        "metrics": TRANSFER_METRICS}
    io.write_json(root.file("transfer_completions.json"), judged)
    io.write_json(root.file("transfer.json"), out)
    return out


def _own_baseline(root: RunFolder, code: str, confidence: str) -> dict:
    """A language's baseline rates from its own run's summary."""
    res = RunFolder(root.path / code).read_json("summary.json")["results"]
    return {"harmful_non_refusal": {**res["harmful"]["baseline"]["non_refusal"], "judgement_confidence": confidence},
            "harmless_refusal": {**res["harmless"]["baseline"]["refusal"], "judgement_confidence": confidence}}
