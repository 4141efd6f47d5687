"""Cross-lingual refusal: one refusal direction per language, how each transfers to the others, and how alike they are.

``refusal crosslingual`` (or :func:`crosslingual` from Python) takes prompts in several languages, runs the paper's
extraction and selection once per language with the same settings, then applies every language's direction to every
other language's prompts:

1. **Prompts** (:mod:`.inputs`, :mod:`.pools`, :mod:`.prompt_stage`): per (language, kind), from per-language files
   (``--files``), else a PolyRefuse-style folder (``--polyrefuse``, English train/val from the paper's folder,
   ``--paper``; languages the folder lacks are translated from its English rows), else the built-in sets: English as
   shipped, other languages translated by a backend (the run's own model unless ``--translator`` names another model or
   ``google``) through the cache ``OUT/translations.json``. Every translation made here is checked
   (:func:`refusal.translate.check_translations`); a language with more than ``--max-flagged`` of its translations
   flagged is refused unless ``--allow-flagged``. Every language gets the same seeded train/val/test choice (sizes from
   the config), so sources translated item by item stay aligned by index; ``prompts.json`` says, per kind and split,
   whether the alignment was verified (English originals known), assumed (same sizes) or absent.
1b. **Refusal openings** (:mod:`.openings_stage`): for the languages without a shipped phrase list (``learn_openings:
   missing``, the default; ``all``: every language, shipped lists hidden; ``never``), refusal tokens and phrases
   learned from the model's own contrast on the language's train and val prompts (:mod:`refusal.evaluation.learned`),
   checked against the harmless completions, the prompts and the refusal score; with a translator named, the English
   list translated is a second source. They replace the language's refusal tokens and phrases in every stage below.
2. **Per-language runs** (:mod:`.language_stage`): a main-pipeline :class:`~refusal.runs.pipeline.Run` per language
   in its own subfolder (extract, select, generate, evaluate) on the language's prompts, scored with that language's
   refusal-opening tokens; completions of the test prompts at baseline, with the language's direction ablated
   (harmful) and added (harmless), judged by its evaluate's one judge: substring matching with the language's own
   refusal phrases. Where a
   language's phrase list has low confidence (or none ships for it: English phrases are then used), its summary says so
   (``judgement_confidence``, ``warnings``): a refusal rate of 0 there is a lower bound, not a finding. A language in
   which no direction is found (the model does not refuse there) is recorded as such and stays a target of the transfer
   only.
3. **Transfer** (:mod:`.transfer_stage`, :mod:`.transfer`): direction of language A (row) on prompts of language B
   (column): non-refusal rate under ablation on B's harmful test prompts, refusal rate under activation addition
   (coefficient 1) on B's harmless test prompts, each with its Wilson interval; mean first-token KL(baseline || ablated)
   on B's harmless prompts and mean first-token refusal scores. All off-diagonal pairs decode together in one batched
   generation with a per-row intervention plan; the diagonal (A on A) is the language's own run's completions. A
   language without a direction has an empty row, and its baseline rates come from baseline rows of the same generation.
4. **Similarity** (:mod:`.similarity`): cosine between the selected directions of every pair, and per layer the
   cosine between the reference language's candidate (English, else the first language) at its selected position and
   every other language's candidate at that position.
5. **Plots** (:mod:`.plots`): heatmaps with annotated cells, languages grouped by resource level (high: en fr es;
   medium: de ru zh; low: th sw am; other codes after them) with separators, and the layer curves.

The run (:class:`~refusal.crosslingual.runs.Crosslingual`) holds each language's state in a small
:class:`~refusal.crosslingual.language_stage.Language` and calls the stages, plain functions over the run folder and
the languages' folders. Every stage writes its files atomically and last a ``<stage>.done.json`` (through
:class:`~refusal.runs.folder.RunFolder`) holding a digest of what it read and its outputs' sha256; a stage whose
manifest matches is skipped, so a killed run resumes where it stopped (a language whose four stages finished is
skipped whole). Folder layout (``runs/<model>-crosslingual/`` by default, or ``--output ROOT --name NAME``)::

    OUT/
      config.yaml                  resolved config and the cross-lingual settings
      translations.json            translation cache (only when something was translated)
      translation_checks.json      per-item quality flags of every translation made     (prompts)
      prompts.json                 every language's splits, sources, alignment, cache digests (prompts)
      <lang>/                      one folder per language, as a main run's:
        config.yaml                  that language's config (data named by the prompts' sha256)
        openings.json                learned refusal tokens and phrases, their evidence and agreement (openings;
                                     only languages that learn), openings_completions.json: what they came from
        splits.json                  its prompts after any filtering                  (extract)
        candidates.safetensors       harmful/harmless means, (positions, layers, d)   (extract)
        scores.json, scores.png      bypass / induce / KL of every candidate          (select)
        direction.safetensors        the selected direction (directions.safetensors: ranked set) (select)
        completions.json             baseline + ablation (harmful), baseline + actadd (harmless) (generate)
        judgements.json, judges.json refusal judged with the language's phrases       (evaluate)
        summary.json                 rates with Wilson intervals, judgement_confidence, warnings (evaluate)
        <stage>.done.json
      transfer.json                matrices [source][target]: ablation_non_refusal, addition_refusal (count, n,
                                   rate, low, high), ablation_kl, ablation/addition refusal scores   (transfer)
      transfer_completions.json    every pair's completions and judgements                         (transfer)
      similarity.json              cosine matrix of the selected directions, layer curves          (similarity)
      transfer_ablation.png, transfer_addition.png, transfer_kl.png, similarity.png, layer_similarity.png (plots)
      summary.json                 per-language headline numbers, warnings, provenance
      <stage>.done.json            prompts, transfer, similarity, plots
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "crosslingual": "runs", "Crosslingual": "runs", "CrosslingualResult": "runs", "DEFAULT_LANGUAGES": "inputs",
    "parse_files": "inputs", "parse_languages": "inputs", "language_phrases": "inputs",
    "transfer_rows": "transfer", "generate_transfer": "transfer", "score_transfer": "transfer",
    "transfer_matrices": "transfer",
    "direction_similarity": "similarity", "layer_curves": "similarity",
    "RESOURCE_LEVELS": "plots", "resource_order": "plots", "plot_all": "plots", "PLOTS": "plots",
    "Language": "language_stage", "PromptPlan": "pools", "plan_prompts": "pools",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'refusal.crosslingual' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
