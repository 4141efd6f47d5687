"""Refusal kept where the user wants it: one refusal direction per harm category, and a direction whose ablation
removes refusal for some categories while leaving the others' refusal component untouched.

Per category ``c`` the direction is the difference in means ``r_c = mean(harmful prompts of c) − mean(harmless)``
at the run's selected layer and post-instruction position (:func:`category_directions`, the extraction of
:mod:`.diff_means`, one pass per category). The keep-refusal direction (:func:`keep_refusal_direction`) is the
released categories' direction with every component in the span of the kept categories' directions removed:

    m = Σ_{c released} n_c r_c / Σ n_c          (the global direction restricted to the released categories)
    Q = orthonormal basis of {r_k : k kept}      (QR, i.e. Gram-Schmidt)
    v = m − Qᵀ Q m

Ablating ``v`` (``x ← x − (x·v̂) v̂``) leaves ``x·r_k`` unchanged for every kept ``k``, since ``v ⊥ r_k``: the part of
the activation that reads as "category k, refuse" survives the ablation exactly. Because ``v`` is one direction of
the residual stream, the edit is as cheap as the paper's and exports as weights or a rank-one adapter like any other
direction of the run. This is ``select.keep_refusal_method: orthogonal``; measured on a real model it does not
separate the categories (their directions are nearly the same vector), and the default is the conditional
method (:mod:`.condition`); docs/keep-refusal.md has the numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import RefusalError
from ..models.norms import with_fused_norms
from ..templates import check_prompts_end_with, prompts_post_instruction_ids
from .base import Direction, DirectionSet, orthonormalize
from .diff_means import mean_activations

__all__ = ["category_directions", "check_categories", "keep_refusal_direction", "parse_categories",
           "records_by_category"]


def parse_categories(spec: str | Sequence[str] | None) -> list[str]:
    """Category names from a flag (``"Sexual content,Violence"``; with a ``;`` anywhere the names are split on ``;``
    instead, for names that hold commas: ``"Hate, harassment and discrimination;Violence"``) or a list."""
    if spec is None:
        return []
    if isinstance(spec, str):
        parts = spec.split(";") if ";" in spec else spec.split(",")
    else:
        parts = [str(s) for s in spec]
    out: list[str] = []
    for p in (p.strip() for p in parts):
        if p and p not in out:
            out.append(p)
    return out


def records_by_category(records: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    """Records grouped by their ``category`` field, in order of first appearance (records with none are left out)."""
    out: dict[str, list[Mapping]] = {}
    for r in records:
        c = r.get("category")
        if c is not None and str(c).strip():
            out.setdefault(str(c), []).append(r)
    return out


def check_categories(keep: Sequence[str], records: Sequence[Mapping], where: str = "the harmful train split") -> None:
    """Raise a :class:`RefusalError` (before any model loads) if a category to keep is not among the records'
    categories (the error lists those that exist), or if keeping them would leave no category to release."""
    if not keep:
        return
    have = records_by_category(records)
    if not have:
        raise RefusalError(
            f"Refusal is to be kept for {', '.join(map(repr, keep))}, but no record of {where} has a category.",
            "Give a harmful set whose records carry a 'category' field (e.g. StrongREJECT's or HarmBench's "
            "processed files), or drop --keep-refusal / select.keep_refusal.")
    missing = [c for c in keep if c not in have]
    if missing:
        comma = any("," in c for c in have)
        raise RefusalError(
            f"Unknown categor{'y' if len(missing) == 1 else 'ies'} {', '.join(map(repr, missing))} in "
            f"--keep-refusal / select.keep_refusal: {where} has "
            + "; ".join(f"'{c}' ({len(v)})" for c, v in have.items()) + ".",
            "Name categories that exist, spelled as above"
            + (" (names that hold commas: separate them with ';' on the command line)." if comma else "."))
    if not set(have) - set(keep):
        raise RefusalError(
            f"Every category of {where} is kept ({', '.join(have)}): there is no category left to release.",
            "Keep refusal for some categories only (the others' refusal is removed).")


@with_fused_norms
def category_directions(
    model, tokenizer, harmful_by_category: Mapping[str, Sequence[str]], harmless: Sequence[str] | torch.Tensor,
    pos: int, layer: int, *, batch_size: int = 32, model_name: str = "",
) -> DirectionSet:
    """Difference-in-means direction of each category at ``(pos, layer)``: ``{category: Direction}``.

    ``harmful_by_category``: formatted prompts per category; ``harmless``: formatted harmless prompts, or their mean
    activation at ``(pos, layer)`` already computed (``(d,)``, e.g. the run's ``candidates.safetensors``), which
    spares one pass. ``pos`` is a negative offset from the end of the prompt (``-1`` the last token), as in
    :class:`~.diff_means.Candidates`. Each direction's ``extra`` holds its category and prompt counts."""
    if pos >= 0:
        raise RefusalError(f"The position must be a negative offset from the end of the prompt (got {pos}).",
                           "Use the run's selected position, e.g. -1 for the last token.")
    if not harmful_by_category:
        raise RefusalError("No category was given to extract directions for.", "Pass at least one category.")
    empty = [c for c, ps in harmful_by_category.items() if not ps]
    if empty:
        raise RefusalError(f"Categories {empty} hold no prompts.", "Give each category at least one prompt.")
    n_pos = -pos
    every = [p for ps in harmful_by_category.values() for p in ps]
    if getattr(tokenizer, "chat_template", None):  # the last positions must be the post-instruction tokens
        post = prompts_post_instruction_ids(tokenizer, every)
        check_prompts_end_with(tokenizer, every, post, "harmful prompt")
        if not isinstance(harmless, torch.Tensor):
            check_prompts_end_with(tokenizer, list(harmless), post, "harmless prompt")
    if isinstance(harmless, torch.Tensor):
        base, n_harmless = harmless.detach().float().cpu().reshape(-1), None
    else:
        if not harmless:
            raise RefusalError("No harmless prompts were given.", "Pass harmless prompts or their mean activation.")
        base = mean_activations(model, tokenizer, list(harmless), n_pos, batch_size, "Extracting (harmless)")[
            0, layer].cpu()
        n_harmless = len(harmless)
    out = DirectionSet()
    for c, prompts in harmful_by_category.items():
        mean = mean_activations(model, tokenizer, list(prompts), n_pos, batch_size, f"Extracting ({c})")[0, layer]
        extra = {"category": c, "n_harmful": len(prompts)}
        if n_harmless is not None:
            extra["n_harmless"] = n_harmless
        out[c] = Direction(mean.cpu() - base, layer, pos, model_name, "diff_means", extra=extra)
    return out


def keep_refusal_direction(
    directions: Mapping[str, Direction], released: Sequence[str], kept: Sequence[str], *,
    weights: Mapping[str, float] | None = None, min_fraction: float = 1e-3,
) -> Direction:
    """The released categories' direction made orthogonal to the span of the kept categories' directions.

    ``directions``: per-category directions (:func:`category_directions`); ``released``: the categories whose
    refusal the ablation should remove; ``kept``: those whose refusal it must leave. The released direction is the
    mean of their ``r_c`` weighted by ``weights`` (default: each direction's ``extra['n_harmful']``, else equal), that
    is the global difference in means restricted to the released categories; its component in span{r_k : k kept}
    (an orthonormal basis by QR) is removed. The raw norm is kept (activation addition uses it); ``extra`` names the
    categories and gives ``norm_fraction`` (|v| / |m|: how much of the released direction is not shared with the
    kept ones) and the cosine of ``v`` with each category's direction."""
    released, kept = list(released), list(kept)
    if not released:
        raise RefusalError("No category to release was given.", "Name at least one category whose refusal to remove.")
    both = sorted(set(released) & set(kept))
    if both:
        raise RefusalError(f"Categories {both} are both released and kept.", "Put each category in one list only.")
    unknown = [c for c in released + kept if c not in directions]
    if unknown:
        raise RefusalError(f"No direction for the categories {unknown} (have: {', '.join(directions)}).",
                           "Extract their directions first (category_directions), or name categories that exist.")
    parts = [directions[c] for c in released + kept]
    if len({(p.layer, p.pos, p.d) for p in parts}) != 1 or any(p.k != 1 or p.per_layer for p in parts):
        raise RefusalError("The category directions must be single vectors of one layer, position and model.",
                           "Extract them together with category_directions.")

    def weight(c: str) -> float:
        if weights is not None:
            return float(weights[c])
        return float(directions[c].extra.get("n_harmful", 1))

    w = torch.tensor([weight(c) for c in released], dtype=torch.float32)
    if (w <= 0).any():
        raise RefusalError(f"The weights of the released categories must be positive (got {w.tolist()}).",
                           "Give positive weights, e.g. the number of prompts of each category.")
    m = (torch.stack([directions[c].vector for c in released]) * w[:, None]).sum(0) / w.sum()
    v = m.clone()
    if kept:
        q = orthonormalize(torch.stack([directions[c].vector for c in kept]))  # (k', d)
        v = m - q.T @ (q @ m)
    fraction = float(v.norm() / m.norm().clamp_min(1e-30))
    if fraction < min_fraction:
        raise RefusalError(
            f"The released categories' direction lies in the span of the kept categories' directions (what is left "
            f"is {fraction:.2e} of its norm): ablating it would not be told apart from the kept categories.",
            "Keep fewer categories, or give more prompts per category so that their directions differ.")
    first = parts[0]
    unit = v / v.norm()
    cos = {c: round(float(unit @ (d.vector / d.vector.norm())), 6) for c, d in directions.items()
           if d.k == 1 and not d.per_layer and d.d == v.shape[0]}
    extra = {"released": released, "kept": kept, "weights": {c: weight(c) for c in released},
             "norm_fraction": round(fraction, 6), "cosine_with_categories": cos}
    return Direction(v, first.layer, first.pos, first.model, "keep_refusal", data_digest=first.data_digest,
                     extra=extra)
