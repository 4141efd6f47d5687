"""Candidate refusal directions: difference in means of residual-stream activations.

For every decoder layer ``l`` (at its input) and every post-instruction position ``p``, the candidate is
``mean(harmful activations) - mean(harmless activations)``. Only running sums are kept, never the activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..batching import in_batches
from ..interventions.hooks import ablate, add
from ..models.norms import with_fused_norms
from ..models.parts import decoder, find_parts, model_device
from ..templates import tokenize


@dataclass
class Direction:
    """One direction with its provenance; ``vector`` is the raw difference in means (not normalised)."""

    vector: torch.Tensor
    layer: int
    pos: int
    model: str = ""
    method: str = "diff_in_means"
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def ablate(self, model, **kwargs):
        """Context manager: ablate this direction at every layer."""
        return ablate(model, self.vector, **kwargs)

    def add(self, model, coeff: float = 1.0):
        """Context manager: add ``coeff`` times this vector at its source layer."""
        return add(model, self.vector, self.layer, coeff=coeff)

    def metadata(self) -> dict[str, Any]:
        return {"layer": self.layer, "pos": self.pos, "model": self.model, "method": self.method,
                "scores": self.scores}

    def save(self, path: str | Path) -> None:
        io.write_tensors(Path(path), {"direction": self.vector.float()}, self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        tensors, meta = io.read_tensors(Path(path))
        return cls(tensors["direction"], int(meta["layer"]), int(meta["pos"]), meta.get("model", ""),
                   meta.get("method", "diff_in_means"), meta.get("scores", {}))


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
    model, tokenizer, prompts: Sequence[str], n_positions: int, batch_size: int = 32, description: str = "",
) -> torch.Tensor:
    """Mean residual-stream input of every layer at the last ``n_positions`` positions: ``(n_pos, n_layers, d)``."""
    parts = find_parts(model)
    dev = model_device(model)
    acc = torch.zeros(n_positions, parts.n_layers, parts.hidden_size, dtype=torch.float32, device=dev)

    def make_hook(i):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            acc[:, i].add_(x[:, -n_positions:, :].float().sum(0).to(dev))
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, layer in enumerate(parts.layers)]
    base = decoder(model)
    try:
        def run(chunk):
            b = tokenize(tokenizer, list(chunk), dev)
            pos = (b.attention_mask.cumsum(-1) - 1).clamp_min(0)  # positions count real tokens, not padding
            base(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos, use_cache=False)

        in_batches(run, list(prompts), batch_size, description)
    finally:
        for h in handles:
            h.remove()
    return acc / len(prompts)


@with_fused_norms
def extract(
    model, tokenizer, harmful: Sequence[str], harmless: Sequence[str], n_positions: int, *,
    batch_size: int = 32, model_name: str = "",
) -> Candidates:
    """Difference-in-means candidates at every layer and the last ``n_positions`` (post-instruction) positions."""
    if not harmful or not harmless:
        raise ValueError("extract needs at least one harmful and one harmless prompt")
    h = mean_activations(model, tokenizer, harmful, n_positions, batch_size, "Extracting (harmful)")
    b = mean_activations(model, tokenizer, harmless, n_positions, batch_size, "Extracting (harmless)")
    return Candidates(h.cpu(), b.cpu(), list(range(-n_positions, 0)), model_name, len(harmful), len(harmless))
