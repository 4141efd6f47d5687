"""Candidate refusal directions: difference in means of residual-stream activations.

For every decoder layer ``l`` (at its input) and every post-instruction position ``p``, the candidate is
``mean(harmful activations) - mean(harmless activations)``. Only running sums are kept, never the activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import io
from ..batching import Batching, in_batches
from ..layout import Bucket, layout, run_decoder
from ..models.norms import with_fused_norms
from ..models.parts import find_parts, model_device
from ..templates import check_prompts_end_with, prompts_post_instruction_ids
from .base import Direction


@dataclass
class Candidates:
    """Means over harmful and harmless prompts, shape ``(n_positions, n_layers, d)``, float32.

    ``positions`` are negative offsets from the end of the prompt (``-n .. -1``).
    """

    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    positions: list[int]
    model: str = ""
    n_harmful: int = 0
    n_harmless: int = 0

    @property
    def diffs(self) -> torch.Tensor:
        return self.harmful_mean - self.harmless_mean

    @property
    def n_layers(self) -> int:
        return self.harmful_mean.shape[1]

    def direction(self, pos: int, layer: int) -> Direction:
        return Direction(self.diffs[self.positions.index(pos), layer].clone(), layer, pos, self.model)

    def save(self, path: str | Path) -> None:
        io.write_tensors(Path(path), {"harmful_mean": self.harmful_mean, "harmless_mean": self.harmless_mean},
                         {"positions": self.positions, "model": self.model, "n_harmful": self.n_harmful,
                          "n_harmless": self.n_harmless})

    @classmethod
    def load(cls, path: str | Path) -> Candidates:
        t, m = io.read_tensors(Path(path))
        return cls(t["harmful_mean"], t["harmless_mean"], list(m["positions"]), m.get("model", ""),
                   int(m.get("n_harmful", 0)), int(m.get("n_harmless", 0)))


@torch.no_grad()
def mean_activations(
    model: Any, tokenizer: Any, prompts: Sequence[str], n_positions: int, batch_size: int = 32,
    description: str = "", *, batching: Batching | None = None,
) -> torch.Tensor:
    """Mean residual-stream input of every layer at the last ``n_positions`` positions: ``(n_pos, n_layers, d)``.

    Each chunk of prompts runs as a :func:`~refusal.layout.layout`: the template's opening that every prompt
    shares runs once and is cached, and the rest in right-padded length buckets, so neither the shared opening nor
    most of the padding is recomputed per prompt (same activations as one left-padded batch, to float rounding).
    ``batching``: the caller's :class:`~refusal.batching.Batching` (remembered batch sizes, quietness)."""
    parts = find_parts(model)
    dev = model_device(model)
    acc = torch.zeros(n_positions, parts.n_layers, parts.hidden_size, dtype=torch.float32, device=dev)
    # a chunk's sums go to ``chunk_acc`` during its forward and into ``acc`` only once the forward has finished,
    # so a chunk retried after running out of memory part-way through the layers is not counted twice
    chunk_acc = torch.zeros_like(acc)
    back = torch.arange(n_positions - 1, -1, -1)
    where: list[torch.Tensor | None] = [None]  # (rows, n_positions) positions of the bucket being run; None: prefix

    def make_hook(i: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            idx = where[0]
            if idx is None:  # the shared prefix: not a post-instruction position
                return
            x = args[0] if args else kwargs["hidden_states"]
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            chunk_acc[:, i].add_(x[rows, idx.to(x.device)].float().sum(0).to(dev))
        return hook

    def before(bucket: Bucket | None) -> None:
        where[0] = None if bucket is None else bucket.last[:, None] - back.to(bucket.last.device)

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, layer in enumerate(parts.layers)]
    try:
        def run(chunk: Sequence[str]) -> None:
            chunk_acc.zero_()
            lay = layout(tokenizer, list(chunk), dev)
            if min(int(b.last.min()) for b in lay.buckets) + 1 < n_positions:  # positions inside the prefix
                lay = layout(tokenizer, list(chunk), dev, share_prefix=False)
            if min(int(b.last.min()) for b in lay.buckets) + 1 < n_positions:
                raise ValueError(f"a prompt is shorter than the {n_positions} positions to extract")
            run_decoder(model, lay, before)
            acc.add_(chunk_acc)

        in_batches(run, list(prompts), batch_size, description, batching=batching)
    finally:
        for h in handles:
            h.remove()
    return acc / len(prompts)


@with_fused_norms
def extract(
    model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], n_positions: int, *,
    batch_size: int = 32, model_name: str = "", batching: Batching | None = None,
) -> Candidates:
    """Difference-in-means candidates at every layer and the last ``n_positions`` (post-instruction) positions.
    ``batching``: the caller's :class:`~refusal.batching.Batching` (remembered batch sizes, quietness)."""
    if not harmful or not harmless:
        raise ValueError("extract needs at least one harmful and one harmless prompt")
    if getattr(tokenizer, "chat_template", None):  # the last positions must be the post-instruction tokens
        post = prompts_post_instruction_ids(tokenizer, list(harmful))  # the thinking mode they were formatted in
        check_prompts_end_with(tokenizer, list(harmful), post, "harmful prompt")
        check_prompts_end_with(tokenizer, list(harmless), post, "harmless prompt")
    h = mean_activations(model, tokenizer, harmful, n_positions, batch_size, "Extracting (harmful)", batching=batching)
    b = mean_activations(model, tokenizer, harmless, n_positions, batch_size, "Extracting (harmless)",
                         batching=batching)
    return Candidates(h.cpu(), b.cpu(), list(range(-n_positions, 0)), model_name, len(harmful), len(harmless))
