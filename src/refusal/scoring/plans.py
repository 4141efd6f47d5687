"""Scoring any interventions, many at a time: the engine behind INLP's component ranking, direction-set search and
cross-lingual KL.

Each candidate is a list of :class:`~refusal.interventions.Intervention` (any operators and scopes). Candidates are
packed along the batch (one candidate's interventions per row, through a per-row
:class:`~refusal.interventions.Plan`), prompts run as the same shared prefix + length buckets that selection uses,
only the last position's logits are computed, and the result is each candidate's refusal score and KL from the
baseline on every prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..batching import Batching, in_batches
from ..interventions.hooks import Plan, apply
from ..interventions.scopes import Intervention
from ..layout import layout, prefix_cache
from ..models.norms import with_fused_norms
from ..models.parts import model_device
from .engine import _bucket_logits, kl_div, layout_logits
from .refusal import refusal_score


@dataclass
class PlanScores:
    """``refusal`` and ``kl`` are ``(n_candidates, n_prompts)``: each candidate's refusal score on each prompt and
    KL(baseline ‖ candidate) of the last-position distribution; ``baseline`` is ``(n_prompts,)``."""

    refusal: torch.Tensor
    kl: torch.Tensor
    baseline: torch.Tensor

    def mean(self, rows: slice | Sequence[int] | torch.Tensor = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean refusal score and mean KL of every candidate over the prompts ``rows``."""
        return self.refusal[:, rows].mean(1), self.kl[:, rows].mean(1)


@torch.no_grad()
@with_fused_norms
def score_interventions(model: Any, tokenizer: Any, prompts: Sequence[str],
                        candidates: Sequence[Sequence[Intervention]], refusal_ids: Sequence[int], *,
                        batch_size: int = 64, description: str = "Scoring", share_prefix: bool = True,
                        min_prefix: int = 4, max_buckets: int = 8, slack: float = 0.03,
                        batching: Batching | None = None) -> PlanScores:
    """Refusal score and KL from the baseline of every candidate on every prompt (already templated)."""
    dev = model_device(model)
    rids = torch.tensor(list(refusal_ids), device=dev)
    lay = layout(tokenizer, list(prompts), dev, share_prefix=share_prefix, min_prefix=min_prefix,
                 max_buckets=max_buckets, slack=slack)
    base_logits = layout_logits(model, lay)
    base_logp = torch.log_softmax(base_logits.float(), -1)
    n_cand, n = len(candidates), len(prompts)
    refusal = torch.zeros(n_cand, n, device=dev)
    kl = torch.zeros(n_cand, n, device=dev)
    widest = max(len(b.rows) for b in lay.buckets)

    def run(chunk: Sequence[int]) -> None:
        c = len(chunk)
        plan = Plan.rows(model, [candidates[i] for i in chunk])
        prefix = None
        if lay.prefix is not None:
            with apply(model, plan):
                prefix = prefix_cache(model, lay, c)
        ref = torch.zeros(c, n, device=dev)
        div = torch.zeros(c, n, device=dev)
        for bucket in lay.buckets:
            m = len(bucket.rows)
            with apply(model, plan.take(torch.arange(c).repeat_interleave(m))):
                logits = _bucket_logits(model, bucket, c, prefix).view(c, m, -1)
            ref[:, bucket.rows] = refusal_score(logits, rids)
            div[:, bucket.rows] = kl_div(base_logp[bucket.rows].unsqueeze(0), torch.log_softmax(logits.float(), -1))
        idx = torch.as_tensor(list(chunk), device=dev)
        refusal[idx], kl[idx] = ref, div  # written only once every bucket is done (an OOM retry counts nothing twice)

    in_batches(run, list(range(n_cand)), max(1, batch_size // widest), description, batching=batching)
    return PlanScores(refusal.cpu(), kl.cpu(), refusal_score(base_logits, rids).cpu())


def spearman(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    x, y = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError("spearman needs two sequences of the same length, at least 2")

    def ranks(v: torch.Tensor) -> torch.Tensor:
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for val in v.unique():  # average ranks over ties
            tie = v == val
            if int(tie.sum()) > 1:
                r[tie] = r[tie].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum() / denom) if denom else float("nan")
