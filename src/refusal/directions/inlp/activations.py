"""The per-prompt activations INLP trains on: the residual-stream inputs of the chosen decoder layers at the last
``n_positions`` (post-instruction) tokens of every prompt, kept per prompt rather than averaged as in
:func:`~refusal.directions.diff_means.mean_activations`. The forward stops after the deepest requested layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ...batching import Batching, in_batches
from ...models.parts import decoder, find_parts, model_device
from ...templates import tokenize


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer: the rest of the forward is not needed."""


@torch.no_grad()
def collect_activations(
    model: Any, tokenizer: Any, prompts: Sequence[str], n_positions: int, layers: Sequence[int] | None = None,
    batch_size: int = 32, description: str = "",
    pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, batching: Batching | None = None,
) -> torch.Tensor:
    """Per-prompt residual-stream inputs of the decoder layers at the last ``n_positions`` tokens.

    Returns ``(n_positions, len(layers), len(prompts), d)`` float32 on the model's device (all layers if ``layers``
    is None; only the requested ones are stored, and the forward stops after the deepest one). Prompts are templated
    already and left-padded, so the last positions are the post-instruction tokens, as in
    :func:`~refusal.directions.diff_means.mean_activations` (whose result is this one's mean over prompts).

    ``pool``, if given, replaces the slice of the last positions: it receives a layer's input ``(B, T, d)`` and the
    batch's attention mask ``(B, T)`` (left padding) and returns ``(B, n_positions, d)`` (e.g. a mean over the
    prompt's tokens, :func:`refusal.directions.condition.instruction_mean`)."""
    parts = find_parts(model)
    dev = model_device(model)
    layers = list(range(parts.n_layers)) if layers is None else [int(i) for i in layers]
    if not layers or len(set(layers)) != len(layers) or not all(0 <= i < parts.n_layers for i in layers):
        raise ValueError(f"layers must be distinct indices in 0..{parts.n_layers - 1}; got {layers}")
    if n_positions < 1:
        raise ValueError("n_positions must be at least 1")
    prompts = list(prompts)
    out = torch.zeros(n_positions, len(layers), len(prompts), parts.hidden_size, dtype=torch.float32, device=dev)
    # a chunk's rows go to ``caught`` during its forward and into ``out`` only once the forward has finished, so a
    # chunk retried after running out of memory part-way through the layers is stored once, from the retry
    caught: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    mask: list[torch.Tensor] = []  # the running chunk's attention mask, for ``pool``

    def make_hook(j: int, i: int) -> Callable[[nn.Module, tuple, dict[str, Any]], None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            kept = x[:, -n_positions:, :] if pool is None else pool(x, mask[0].to(x.device))
            caught[j] = kept.to(device=dev, dtype=torch.float32, copy=True)
            if i == deepest:
                raise _StopForward
        return hook

    handles = [parts.layers[i].register_forward_pre_hook(make_hook(j, i), with_kwargs=True)
               for j, i in enumerate(layers)]
    base = decoder(model)
    done = 0
    try:
        def run(chunk: Sequence[str]) -> None:
            nonlocal done
            caught.clear()
            b = tokenize(tokenizer, list(chunk), dev)
            mask[:] = [b.attention_mask]
            pos = (b.attention_mask.cumsum(-1) - 1).clamp_min(0)  # positions count real tokens, not padding
            try:
                base(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos, use_cache=False)
            except _StopForward:
                pass
            rows = torch.stack([caught[j] for j in range(len(layers))])  # (L, B, n_pos, d)
            out[:, :, done:done + len(chunk)] = rows.permute(2, 0, 1, 3)
            done += len(chunk)
            caught.clear()

        in_batches(run, prompts, batch_size, description, batching=batching)
    finally:
        for h in handles:
            h.remove()
        caught.clear()
    return out
