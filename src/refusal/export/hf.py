"""Export an abliterated model as a plain Hugging Face folder: the ablation baked into the weights.

>>> export_hf(model, tokenizer, direction, "out/qwen-abliterated", card={"scores": summary})

The folder holds safetensors weights, ``config.json``, the tokenizer with its chat template and a ``README.md`` model
card; it loads with ``AutoModelForCausalLM.from_pretrained`` and needs nothing from this package. It is written to a
temporary folder next to ``out_dir`` and renamed into place, so ``out_dir`` is either complete or absent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import RefusalError
from ..interventions.weights import EditOptions, _check_weights, orthogonalize_, orthogonalized, prepare_bases
from ..models.loading import clear_quantizer
from ..models.parts import find_parts
from ..models.writers import Writer, residual_writers

if TYPE_CHECKING:
    from ..interventions.weights import DirectionLike

__all__ = ["check_out_dir", "export_hf", "model_card"]


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise RefusalError(f"'{out}' already exists.", "Pass overwrite=True (--overwrite) or choose another path.")
    if out.exists() and not out.is_dir():
        raise RefusalError(f"'{out}' exists and is not a folder.", "Choose another path.")


def _direction_info(direction: DirectionLike) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if hasattr(direction, "vectors") and not isinstance(direction, torch.Tensor):
        for k in ("layer", "pos", "method", "model"):
            v = getattr(direction, k, None)
            if v not in (None, ""):
                info[k] = v
        direction = direction.vectors
    if isinstance(direction, torch.Tensor):
        shape = tuple(direction.shape)
        info["shape"] = list(shape)
        info["kind"] = ("one direction" if len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)
                        else f"a {shape[0]}-dimensional subspace" if len(shape) == 2
                        else f"one {shape[1]}-row basis per layer ({shape[0]} layers)")
    return info


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            rows += _flatten(v, f"{key} / ")
        else:
            rows.append((key, v))
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def model_card(base_model: str, how: Mapping[str, Any], card: Mapping[str, Any] | None = None) -> str:
    """README.md text: YAML front matter, how the model was made, and the scores given in ``card``.

    ``card`` keys: ``base_model`` and ``name`` (override), ``notes`` (free text), ``scores`` (a flat or nested dict,
    rendered as a table); any other key is listed under details."""
    from .. import __version__

    card = dict(card or {})
    base = str(card.pop("base_model", base_model) or "")
    name = str(card.pop("name", "") or (f"{base.rstrip('/').split('/')[-1]}-abliterated" if base else "abliterated"))
    notes = card.pop("notes", None)
    scores = card.pop("scores", None)
    lines = ["---"]
    if base and not Path(base).is_absolute():
        lines.append(f"base_model: {base}")
    lines += ["library_name: transformers", "tags:", "- abliterated", "- refusal-direction", "- orthogonalized",
              "---", "", f"# {name}", ""]
    lines.append(f"This is {f'`{base}`' if base else 'a chat model'} with its refusal direction ablated from the "
                 "weights (*weight orthogonalization*, Arditi et al. 2024, \"Refusal in Language Models Is Mediated "
                 f"by a Single Direction\"), made with `refusal` {__version__}. It loads like any Hugging Face "
                 "model and needs no extra code.")
    lines += ["", "## How it was made", ""]
    for k, v in how.items():
        lines.append(f"- **{k}**: {_fmt(v)}")
    lines += ["", "Every matrix that writes to the residual stream (the token embedding, every attention output "
              "projection, every MLP / expert output projection and their biases) was projected so that it can no "
              "longer write the direction: `W ← W − w_l·B̂ᵀB̂W` along its output axis, `B̂` the orthonormal basis "
              "of the direction. With plain projection (no norm preservation, all layer weights 1) this equals "
              "ablating the direction from the residual stream at every layer with hooks."]
    return "\n".join(lines + card_tail(scores, card, notes)) + "\n"


def card_tail(scores: Any, card: Mapping[str, Any] | None, notes: Any) -> list[str]:
    """The lines every model card ends with: the run's scores, its details, notes, and the caveats."""
    lines: list[str] = []
    if scores:
        rows = _flatten(scores) if isinstance(scores, Mapping) else [("score", scores)]
        lines += ["", "## Scores", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in rows]
    if card:
        lines += ["", "## Details", ""]
        lines += [f"- **{_fmt(k)}**: {_fmt(v)}" for k, v in _flatten(card)]
    if notes:
        lines += ["", "## Notes", "", str(notes)]
    lines += ["", "## Caveats", "",
              "Removing the refusal direction makes the model comply with requests it was trained to refuse. "
              "Its other behaviour can change too; evaluate it before use, and use it responsibly and lawfully."]
    return lines


def _how(model: Any, direction: DirectionLike, writers: Sequence[Writer], options: EditOptions) -> dict[str, Any]:
    kinds = Counter(w.kind for w in writers)
    n_experts = sum(w.n_experts for w in writers if w.kind == "expert")
    n_shared = sum(w.n_experts for w in writers if w.kind == "shared_expert")
    how: dict[str, Any] = {"method": "weight orthogonalization (directional ablation baked into the weights)"}
    for k, v in _direction_info(direction).items():
        how[f"direction {k}"] = v
    edited = [f"{kinds.get('embedding', 0)} embedding", f"{kinds.get('attention', 0)} attention output",
              f"{kinds.get('mlp', 0)} MLP output"]
    if n_experts:
        edited.append(f"{n_experts} expert output")
    if n_shared:
        edited.append(f"{n_shared} shared-expert output")
    how["edited matrices"] = ", ".join(edited) + " matrices"
    how["norm preserving"] = "yes (heretic's row-norm-preserving variant)" if options.get("norm_preserving") else "no"
    how["orthogonal to the harmless mean"] = "yes" if options.get("orthogonal_to_harmless") is not None else "no"
    lw = options.get("layer_weights")
    how["layer weights"] = "1 at every layer" if lw is None else ", ".join(f"{float(x):.3g}" for x in lw)
    how["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return how


def _atomic_save(out: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    old = None
    try:
        write(tmp)
        if out.exists():
            if not overwrite:  # appeared while we were writing
                raise RefusalError(f"'{out}' already exists.", "Pass overwrite=True (--overwrite).")
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
        from .. import io

        io.share(tmp)  # mkdtemp makes it private: the umask's permissions, as a plain mkdir would give
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def export_hf(
    model: Any,
    tokenizer: Any,
    direction_or_subspace: DirectionLike,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    card: Mapping[str, Any] | None = None,
    in_place: bool = False,
    norm_preserving: bool = False,
    orthogonal_to_harmless: torch.Tensor | None = None,
    layer_weights: Sequence[float] | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Bake the ablation of ``direction_or_subspace`` into the weights and save a Hugging Face folder at
    ``out_dir`` (safetensors, config, tokenizer with chat template, README.md model card).

    By default the caller's model is left unchanged afterwards (only the edited matrices are copied, and restored
    after saving); ``in_place=True`` keeps the edit. The direction may be ``(d,)``, ``(k, d)``, ``(n_layers, k, d)``
    or a :class:`~refusal.directions.base.Direction`; a hidden size or per-layer count that does not match the model,
    or an existing ``out_dir`` without ``overwrite``, raises :class:`RefusalError` before anything is written.
    ``card`` gives the model card's scores and details (see :func:`model_card`)."""
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    parts = find_parts(model)
    prepare_bases(direction_or_subspace, parts.hidden_size, parts.n_layers, orthogonal_to_harmless)  # checks
    _check_weights(layer_weights, parts.n_layers)
    writers = residual_writers(model)
    options: EditOptions = {"norm_preserving": norm_preserving, "orthogonal_to_harmless": orthogonal_to_harmless,
               "layer_weights": layer_weights}
    base = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    readme = model_card(base, _how(model, direction_or_subspace, writers, options), card)
    clear_quantizer(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(readme, encoding="utf-8")

    if in_place:
        orthogonalize_(model, direction_or_subspace, **options)
        _atomic_save(out, overwrite, write)
    else:
        with orthogonalized(model, direction_or_subspace, **options):
            _atomic_save(out, overwrite, write)
    return out
