"""The INLP entry points: :func:`inlp` on activations already collected (it checks their shapes, splits each class
into training and held-out prompts and runs the rounds block by block of components) and :func:`extract_inlp`, which
collects the activations from a model and prompts first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...models.norms import with_fused_norms
from ...models.parts import find_parts
from ...templates import check_prompts_end_with, prompts_post_instruction_ids
from .activations import collect_activations
from .classifier import CLASSIFIERS
from .nullspace import _inlp_chunk
from .result import InlpResult


def _components(acts: torch.Tensor, what: str) -> torch.Tensor:
    if acts.ndim == 4:
        return acts.reshape(-1, *acts.shape[2:])
    if acts.ndim != 3:
        raise ValueError(f"{what} activations must be (C, N, d) or (n_positions, n_layers, N, d); got "
                         f"{tuple(acts.shape)}")
    return acts


def inlp(
    harmful_acts: torch.Tensor, harmless_acts: torch.Tensor, *, n_iterations: int = 16, min_accuracy: float = 0.55,
    margin: float = 0.02, heldout_fraction: float = 0.2, classifier: str = "logistic", l2: float = 1e-3,
    seed: int = 0, positions: Sequence[int] | None = None, layers: Sequence[int] | None = None,
    component_batch: int | None = None, max_newton: int = 100, model_name: str = "",
) -> InlpResult:
    """Iterative nullspace projection at every component, batched over components.

    ``harmful_acts`` ``(C, N_h, d)`` and ``harmless_acts`` ``(C, N_b, d)``, or the 4-D output of
    :func:`collect_activations` (flattened position-major). A 4-D input's components are ``positions`` (default
    ``-n_positions..-1``) × ``layers`` (default ``0..n_layers-1``; pass the layers that were collected); a 3-D input's
    are ``layers`` (default ``0..C-1``) at ``positions`` (default ``[-1]``).

    Each class is split at random (``seed``) into ``heldout_fraction`` held out and the rest for training, the same
    prompts for every component. A round trains the classifier (``"logistic"`` or ``"svm"``, squared hinge; L2
    strength ``l2`` on activations scaled to unit mean squared norm per component, see
    :func:`~.classifier.fit_linear`) and
    measures its balanced accuracy on the held-out prompts (on the training ones if ``heldout_fraction == 0``). Its
    direction is accepted if that accuracy is at least ``min_accuracy`` and more than ``0.5 + margin`` (not within
    ``margin`` of chance). Otherwise the component stops: no direction is added, so the next round would see the
    same activations and train the same classifier (the reference implementation keeps going with ``continue``
    because its rounds are randomised; ours are deterministic given ``seed``). At most ``n_iterations`` rounds.

    ``component_batch`` bounds how many components are processed at once (memory: about ``3 * N * d`` float64
    values per component); None does all together."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}; got {classifier!r}")
    if n_iterations < 1 or l2 <= 0 or not 0 <= heldout_fraction < 1:
        raise ValueError("need n_iterations >= 1, l2 > 0 and 0 <= heldout_fraction < 1")
    four_d = harmful_acts.ndim == 4
    position_list: list[int]  # the components' positions and layers, from either layout (below)
    layer_list: list[int]
    if four_d:
        position_list = list(range(-harmful_acts.shape[0], 0)) if positions is None else list(positions)
        layer_list = list(range(harmful_acts.shape[1])) if layers is None else list(layers)
        if (len(position_list), len(layer_list)) != tuple(harmful_acts.shape[:2]):
            raise ValueError(f"{len(position_list)} positions × {len(layer_list)} layers do not match activations "
                             f"of shape {tuple(harmful_acts.shape)}")
    h, b = _components(harmful_acts, "harmful"), _components(harmless_acts, "harmless")
    if h.shape[0] != b.shape[0] or h.shape[2] != b.shape[2]:
        raise ValueError(f"harmful {tuple(h.shape)} and harmless {tuple(b.shape)} activations must have the same "
                         "components and hidden size")
    C = h.shape[0]
    if not four_d:
        position_list = [-1] if positions is None else list(positions)
        layer_list = list(range(C // max(1, len(position_list)))) if layers is None else list(layers)
    if len(position_list) * len(layer_list) != C:
        raise ValueError(f"{len(position_list)} positions × {len(layer_list)} layers != {C} components")
    b = b.to(h.device)

    gen = torch.Generator().manual_seed(seed)
    splits = []
    for n in (h.shape[1], b.shape[1]):
        perm = torch.randperm(n, generator=gen)
        n_he = int(round(n * heldout_fraction))
        if heldout_fraction > 0:
            n_he = max(1, n_he)
        if n - n_he < 1 or (heldout_fraction > 0 and n_he < 1):
            raise ValueError(f"too few prompts ({n}) in a class for a held-out fraction of {heldout_fraction}")
        splits.append((perm[n_he:].sort().values.to(h.device), perm[:n_he].sort().values.to(h.device)))
    (tr_h, he_h), (tr_b, he_b) = splits

    def labels(n_h: int, n_b: int) -> torch.Tensor:
        return torch.cat([torch.ones(n_h, dtype=torch.bool), torch.zeros(n_b, dtype=torch.bool)]).to(h.device)

    ytr, yhe = labels(len(tr_h), len(tr_b)), labels(len(he_h), len(he_b))
    step = C if not component_batch else int(component_batch)
    parts = []
    for c0 in range(0, C, step):
        hc, bc = h[c0:c0 + step].float(), b[c0:c0 + step].float()
        xtr = torch.cat([hc[:, tr_h], bc[:, tr_b]], 1)
        xhe = torch.cat([hc[:, he_h], bc[:, he_b]], 1)
        del hc, bc
        parts.append({k: v.cpu() for k, v in _inlp_chunk(xtr, ytr, xhe, yhe, n_iterations, min_accuracy, margin,
                                                          classifier, l2, max_newton).items()})
        del xtr, xhe
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    k_max = int(out["rank"].max()) if C else 0
    config = {"n_iterations": n_iterations, "min_accuracy": min_accuracy, "margin": margin,
              "heldout_fraction": heldout_fraction, "classifier": classifier, "l2": l2, "seed": seed,
              "n_harmful": int(h.shape[1]), "n_harmless": int(b.shape[1]),
              "n_train": [len(tr_h), len(tr_b)], "n_heldout": [len(he_h), len(he_b)]}
    return InlpResult(out["basis"][:, :k_max].float().contiguous(), out["rank"], out["train_accuracy"],
                      out["heldout_accuracy"], position_list, layer_list,
                      out["weights"][:, :k_max].float().contiguous(), out["first"].float(), config, model_name)


@with_fused_norms
def extract_inlp(
    model: Any, tokenizer: Any, harmful_prompts: Sequence[str], harmless_prompts: Sequence[str], n_positions: int,
    layers: Sequence[int] | None = None, *, batch_size: int = 32, model_name: str = "", **kw: Any,
) -> InlpResult:
    """Collect per-prompt activations (:func:`collect_activations`) and run :func:`inlp` on them (``**kw``)."""
    if not harmful_prompts or not harmless_prompts:
        raise ValueError("extract_inlp needs harmful and harmless prompts")
    if getattr(tokenizer, "chat_template", None):  # the last positions must be the post-instruction tokens
        check_prompts_end_with(tokenizer, list(harmful_prompts) + list(harmless_prompts),
                               prompts_post_instruction_ids(tokenizer, list(harmful_prompts)))
    layers = list(range(find_parts(model).n_layers)) if layers is None else list(layers)
    h = collect_activations(model, tokenizer, harmful_prompts, n_positions, layers, batch_size,
                            "Collecting activations (harmful)")
    b = collect_activations(model, tokenizer, harmless_prompts, n_positions, layers, batch_size,
                            "Collecting activations (harmless)")
    return inlp(h, b, positions=list(range(-n_positions, 0)), layers=layers, model_name=model_name, **kw)

