"""Export the weight edit as a PEFT LoRA adapter instead of a whole model.

>>> export_adapter(model, direction, "out/qwen-refusal-lora", base_model="Qwen/Qwen2.5-7B-Instruct")

Weight orthogonalization (:mod:`refusal.interventions.weights`) changes every residual writer ``W`` (``d × in``,
output on the residual axis) to ``W' = W − s·B̂ᵀB̂W``, ``B̂`` the orthonormal ``(k, d)`` basis of the direction or
subspace and ``s`` the layer's weight. The change is exactly rank ``k``, so PEFT's LoRA (``W + scaling · B A``) holds it
with ``lora_B = −s·B̂ᵀ`` (``d × k``), ``lora_A = B̂W`` (``k × in``) and ``lora_alpha = r`` (scaling 1). The embedding
``E`` (``vocab × d``) is edited on its residual axis, ``E' = E − s·E B̂ᵀB̂``; PEFT's embedding LoRA adds
``(lora_embedding_B lora_embedding_A)ᵀ``, so ``lora_embedding_A = B̂Eᵀ`` (``k × vocab``) and
``lora_embedding_B = −s·B̂ᵀ``. Per-layer bases, layer weights and the orthogonal-to-harmless option change only
``B̂`` and ``s``, so every edit the run can make is exact, except:

* heretic's norm-preserving variant rescales every row afterwards: not low rank, refused;
* a bias with a component along the direction (``b' = b − s·B̂ᵀB̂b``): PEFT's ``lora_bias`` cannot be combined with
  an embedding LoRA, refused (zero or absent biases, the common case, are fine);
* writers that are not ``nn.Linear`` (nor fused experts): refused.

Fused experts (transformers 5 MoE: one 3-D ``nn.Parameter`` such as ``mlp.experts.down_proj`` for all experts) go
through PEFT's ``target_parameters`` (PEFT >= 0.17, ``lora.ParamWrapper``). PEFT reads the parameter ``(E, n1, n2)``
as ``(E, out, in)`` unless the module's ``is_transposed`` is set (then ``(E, in, out)``), keeps
``lora_A`` ``(E·r, in)`` and ``lora_B`` ``(out, r·E)`` and adds, for expert ``e``, ``B_e A_e`` (``out × in``, stored
transposed when ``is_transposed``) with ``A_e = lora_A[e·r:(e+1)·r]`` and ``B_e = lora_B[:, e::E]`` (column
``j·E + e``). Every expert thus has its own rank-``r`` pair, and the per-expert edit ``−s·B̂ᵀ(B̂W_e)`` (``W_e`` with
its residual axis first) is exact: ``B_e = −s·B̂ᵀ``, ``A_e = B̂W_e`` when PEFT's ``out`` axis is the residual one,
else ``B_e = (B̂W_e)ᵀ``, ``A_e = −s·B̂``. A fused ``down_proj_bias`` is checked like any bias.

In such a model the MLP-side Linear writers (a dense layer's or a shared expert's ``down_proj``) are targeted as
parameters too (``<module>.weight``; PEFT's ``ParamWrapper`` on a 2-D weight adds ``lora_B lora_A`` like a Linear
LoRA, under the same key names): on transformers 5, PEFT rewrites ``target_modules`` entries named like
transformers-4 expert projections (``down_proj``, ``w2``, ...) of MoE families into fused-parameter targets, which
would drop those Linear layers' LoRA silently.

Layers whose bases have fewer rows than others get zero-padded factors (still exact), so the adapter has one rank
``r`` and needs no ``rank_pattern``. The folder holds ``adapter_config.json``, ``adapter_model.safetensors`` (PEFT's
key names, float32 by default; the model's identity, the direction and the run also in the safetensors header) and a
``README.md`` model card; it is written next to ``out_dir`` and renamed into place. Nothing here imports ``peft``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import RefusalError
from ..interventions.weights import EditOptions, _check_weights, _resident, prepare_bases
from ..models.parts import find_parts
from ..models.writers import Writer, residual_writers
from .hf import _atomic_save, _direction_info, _fmt, _how, card_tail, check_out_dir

if TYPE_CHECKING:
    from ..interventions.weights import DirectionLike

__all__ = ["LoraFactor", "VLLM_RANKS", "export_adapter", "lora_factors", "peft_state_dict", "vllm_max_lora_rank"]

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
_EMBED_CHUNK = 1 << 15  # embedding rows per float32 matmul, so a large vocabulary is never copied whole


@dataclass(frozen=True)
class LoraFactor:
    """One edited module's LoRA factors (float32, CPU): ``W' = W + b @ a`` for a Linear, ``E' = E + (b @ a)ᵀ`` for
    an embedding."""

    module: str  # the module's qualified name in the model, e.g. "model.layers.3.self_attn.o_proj"
    kind: str  # "linear" | "embedding" | "experts"
    a: torch.Tensor  # (k, in) or (k, vocab); experts: (E, k, in), PEFT's in/out (see the module doc)
    b: torch.Tensor  # (out, k) or (d, k); experts: (E, out, k)
    # the qualified name of the parameter PEFT targets through ``target_parameters`` (fused experts, e.g.
    # "model.layers.3.mlp.experts.down_proj", and the MLP Linear weights of a model that has them); "" for a module
    parameter: str = ""

    @property
    def rank(self) -> int:
        return self.a.shape[-2]


def _module_name(wr: Writer) -> str:
    suffix = f".{wr.attr}"
    return wr.name[: -len(suffix)] if wr.name.endswith(suffix) else wr.name


def _refuse_norm_preserving() -> None:
    raise RefusalError(
        "The norm-preserving edit rescales every row of every edited matrix after the projection, which is not a "
        "low-rank change: a LoRA adapter cannot hold it exactly.",
        "Export it as a merged model (`refusal abliterate RUN --out DIR --norm-preserving`), or write the adapter "
        "for the plain edit (without --norm-preserving).")


def _check_writer(wr: Writer) -> None:
    want = nn.Embedding if wr.kind == "embedding" else nn.Linear
    if not wr.fused and not isinstance(wr.module, want):
        raise RefusalError(
            f"{_module_name(wr)} is a {type(wr.module).__name__}, not an {want.__name__}: PEFT's LoRA layout for it "
            "is not the plain one this export writes.",
            "Export this model merged (`refusal abliterate RUN --out DIR`).")
    if not wr.weight.is_floating_point() and wr.weight.device.type != "meta":
        raise RefusalError(f"{wr.name} is stored as {wr.weight.dtype} (a quantized model?).",
                           "Load the model in a float dtype (--dtype float32 or bfloat16) to write an adapter.")


def _peft_out_axis(wr: Writer) -> int:
    """The axis of a fused ``(E, n1, n2)`` parameter that PEFT's ``ParamWrapper`` treats as the output: 2 when the
    module says ``is_transposed`` (PEFT reads the flag the same way), else 1."""
    return 2 if getattr(wr.module, "is_transposed", False) else 1


def _expert_factors(w: torch.Tensor, basis: torch.Tensor, s: float, axis: int, out_axis: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` ``(E, k, in)``, ``(E, out, k)`` in PEFT's orientation for the fused weight ``w`` whose residual
    axis is ``axis``, computed in float32 an expert at a time."""
    a, b = [], []
    for e in range(w.shape[0]):
        r = w[e].float()
        proj = basis @ (r if axis == 1 else r.T)  # B̂W_e, (k, m)
        if out_axis == axis:  # PEFT's output is the residual axis
            a.append(proj.cpu())
            b.append((-s * basis.T).cpu())
        else:
            a.append((-s * basis).cpu())
            b.append(proj.T.cpu())
    return torch.stack(a).contiguous(), torch.stack(b).contiguous()


def _embedding_a(e: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``B̂ Eᵀ`` (``(k, vocab)``), computed in float32 a block of rows at a time."""
    basis = basis.to(e.device)
    out = [(e[i:i + _EMBED_CHUNK].float() @ basis.T).T.cpu() for i in range(0, e.shape[0], _EMBED_CHUNK)]
    return torch.cat(out, dim=1)


@torch.no_grad()
def lora_factors(model: nn.Module, direction: DirectionLike, *, orthogonal_to_harmless: torch.Tensor | None = None,
                 layer_weights: Sequence[float] | None = None, norm_preserving: bool = False) -> list[LoraFactor]:
    """The exact LoRA factors of :func:`~refusal.interventions.weights.orthogonalize_` with the same options, one
    per edited module (layers with weight 0 are left out). The model is not changed.

    Raises :class:`RefusalError` for an edit a LoRA adapter cannot hold (see the module doc) before any work."""
    if norm_preserving:
        _refuse_norm_preserving()
    parts = find_parts(model)
    bases = prepare_bases(direction, parts.hidden_size, parts.n_layers, orthogonal_to_harmless)
    weights = _check_weights(layer_weights, parts.n_layers)
    every = residual_writers(model)
    has_fused = any(wr.fused for wr in every)
    writers = [wr for wr in every if weights[0 if wr.layer is None else wr.layer] != 0.0]
    for wr in writers:
        _check_writer(wr)
    tensors = _resident(writers)  # a weight offloaded to disk is refused before any work
    for wr, (_, bias) in zip(writers, tensors):
        if bias is None:
            continue
        basis = bases[0 if wr.layer is None else wr.layer].to(bias.device)
        b = bias.float()  # (d,) or, for fused experts, (E, d)
        if (b @ basis.T).norm() > 1e-6 * b.norm():  # exactly 0 for a zero bias
            raise RefusalError(
                f"The bias of {_module_name(wr)} has a component along the direction, which the edit removes "
                "(b' = b − B̂ᵀB̂b); a LoRA adapter on the weights cannot hold that, and PEFT's lora_bias does not "
                "combine with the embedding's LoRA.",
                "Export this model merged (`refusal abliterate RUN --out DIR`).")
    out = []
    for wr, (w, _) in zip(writers, tensors):
        i = 0 if wr.layer is None else wr.layer
        basis, s = bases[i].to(w.device), weights[i]
        b = (-s * basis.T).contiguous().cpu()  # (d, k)
        if wr.fused:
            a, b = _expert_factors(w, basis, s, wr.axis, _peft_out_axis(wr))
            out.append(LoraFactor(_module_name(wr), "experts", a, b, wr.name))
        elif wr.kind == "embedding":
            out.append(LoraFactor(_module_name(wr), "embedding", _embedding_a(w, basis).contiguous(), b))
        else:
            param = wr.name if has_fused and wr.kind in ("mlp", "expert", "shared_expert") else ""
            out.append(LoraFactor(_module_name(wr), "linear", (basis @ w.float()).contiguous().cpu(), b, param))
    return out


def _pad(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    if t.shape[dim] == rank:
        return t
    shape = list(t.shape)
    shape[dim] = rank - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def peft_state_dict(factors: Sequence[LoraFactor], rank: int | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` under PEFT's names (``base_model.model.<module>.lora_A.weight``,
    ``…lora_B.weight``; ``…lora_embedding_A`` / ``…lora_embedding_B`` for an embedding), each padded with zeros to
    ``rank`` (default: the largest factor rank). Fused experts get PEFT's ``ParamWrapper`` layout on their module's
    name: ``lora_A`` ``(E·r, in)`` expert-major, ``lora_B`` ``(out, r·E)`` expert-minor."""
    r = rank or max(f.rank for f in factors)
    out: dict[str, torch.Tensor] = {}
    for f in factors:
        key = f"base_model.model.{f.module}"
        if f.kind == "experts":
            a, b = _pad(f.a, r, 1), _pad(f.b, r, 2)  # (E, r, in), (E, out, r)
            n = a.shape[0]
            out[f"{key}.lora_A.weight"] = a.reshape(n * r, a.shape[2]).to(dtype).contiguous()
            out[f"{key}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * n).to(dtype).contiguous()
            continue
        a, b = _pad(f.a, r, 0).to(dtype).contiguous(), _pad(f.b, r, 1).to(dtype).contiguous()
        if f.kind == "embedding":
            out[f"{key}.lora_embedding_A"], out[f"{key}.lora_embedding_B"] = a, b
        else:
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a, b
    return out


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest value vLLM accepts for ``--max-lora-rank`` that holds ``rank``."""
    for v in VLLM_RANKS:
        if v >= rank:
            return v
    raise RefusalError(f"The adapter has rank {rank}, above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}).",
                       "Use a subspace of fewer directions, or the merged export.")


def _peft_config(factors: Sequence[LoraFactor], rank: int, base_model: str, revision: str | None) -> dict[str, Any]:
    """A PEFT LoraConfig as JSON, with only the keys every PEFT version since 0.12 reads (an unknown key makes
    PEFT warn on every load), and ``target_modules`` the exact module names. Fused expert parameters go in
    ``target_parameters`` (PEFT >= 0.17), written only when there are any."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "revision": revision,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,  # scaling = lora_alpha / r = 1
        "lora_dropout": 0.0,
        "target_modules": [f.module for f in factors if not f.parameter],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    params = [f.parameter for f in factors if f.parameter]
    if params:
        config["target_parameters"] = params
    return config


def _hub_revision(base_model: str, identity: str) -> str | None:
    """The commit of a ``hub:ID@COMMIT`` identity when it names ``base_model``: PEFT loads that revision."""
    m = re.fullmatch(r"hub:(.+)@([0-9a-f]{7,64})", identity or "")
    return m.group(2) if m and m.group(1) == base_model else None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def adapter_card(base_model: str, how: Mapping[str, Any], *, rank: int, n_modules: int, has_embedding: bool,
                 tied: bool, adapter_bytes: int, merged_bytes: int, card: Mapping[str, Any] | None = None,
                 n_parameters: int = 0) -> str:
    """README.md text for the adapter folder: what it is, how it was made, how to load and serve it.
    ``n_parameters``: how many parameters the adapter targets through PEFT's ``target_parameters`` (a model with
    fused experts)."""
    from .. import __version__

    card = dict(card or {})
    base = str(card.pop("base_model", base_model) or "")
    name = str(card.pop("name", "") or (f"{base.rstrip('/').split('/')[-1]}-refusal-lora" if base
                                        else "refusal-lora"))
    notes, scores = card.pop("notes", None), card.pop("scores", None)
    base_ref = base or "BASE_MODEL"
    lines = ["---"]
    if base and not Path(base).is_absolute():
        lines.append(f"base_model: {base}")
    lines += ["library_name: peft", "tags:", "- abliterated", "- refusal-direction", "- lora", "---", "",
              f"# {name}", "",
              f"A LoRA adapter for {f'`{base}`' if base else 'its base model'} that removes the refusal direction "
              "(*weight orthogonalization*, Arditi et al. 2024, \"Refusal in Language Models Is Mediated by a Single "
              f"Direction\"), made with `refusal` {__version__}. Base model + adapter equals the merged abliterated "
              f"model: the edit `W ← W − s·B̂ᵀB̂W` has rank {rank} per matrix, and the adapter holds it exactly "
              f"(`lora_B = −s·B̂ᵀ`, `lora_A = B̂W`, `lora_alpha = r = {rank}`).", "",
              "## How it was made", ""]
    lines += [f"- **{k}**: {_fmt(v)}" for k, v in how.items()]
    lines += [f"- **LoRA modules**: {n_modules} (exact module names in `adapter_config.json`), rank {rank}",
              f"- **size**: {_size(adapter_bytes)} (the merged model's weights: {_size(merged_bytes)} at its dtype)",
              "", "## Use", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"base = AutoModelForCausalLM.from_pretrained(\"{base_ref}\")",
              "model = PeftModel.from_pretrained(base, \"THIS_FOLDER\")"
              + ("" if has_embedding and tied else "  # or .merge_and_unload()"),
              f"tokenizer = AutoTokenizer.from_pretrained(\"{base_ref}\")", "```", "",
              "Serving with vLLM (requests name the model `refusal`):", "", "```bash",
              f"vllm serve {base_ref} --enable-lora --lora-modules refusal=THIS_FOLDER "
              f"--max-lora-rank {vllm_max_lora_rank(rank)}", "```"]
    if n_parameters:
        lines += ["", f"The adapter also edits {n_parameters} parameters through PEFT's `target_parameters`: the fused "
                  f"expert weights (one 3-D parameter for all experts of a layer, rank {rank} per expert) and the "
                  "MLP output projections beside them. Loading it needs PEFT >= 0.17 (tested with 0.21 on "
                  "transformers 5). Servers that load LoRA only on modules may refuse it: serve the merged export "
                  "(`refusal abliterate RUN --out DIR`) there."]
    if has_embedding:
        lines += ["", "The adapter also edits the token embedding (`lora_embedding_A/B`). PEFT applies it (with the "
                  "embedding's scale, where a model has one, in recent PEFT versions); vLLM loads LoRA on the "
                  "embedding only for model classes that register it, and refuses the adapter otherwise: serve "
                  "the merged export (`refusal abliterate RUN --out DIR`) there."]
    if has_embedding and tied:
        lines += ["", "The base model ties its output head to the token embedding. The adapter edits only the input "
                  "side (as the merged export does, which unties them), so PEFT warns about the tied layer: "
                  "harmless while the adapter is applied, but do not `merge_and_unload()` it, which would write the "
                  "embedding's change into the shared output head too. For a merged model use "
                  "`refusal abliterate RUN --out DIR`."]
    return "\n".join(lines + card_tail(scores, card, notes)) + "\n"


def _merged_bytes(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in seen and p.is_floating_point():
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def export_adapter(
    model: Any,
    direction_or_subspace: DirectionLike,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    identity: str | None = None,
    overwrite: bool = False,
    card: Mapping[str, Any] | None = None,
    orthogonal_to_harmless: torch.Tensor | None = None,
    layer_weights: Sequence[float] | None = None,
    norm_preserving: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the weight edit of ``direction_or_subspace`` as a PEFT LoRA adapter folder at ``out_dir``.

    The options are :func:`~refusal.interventions.weights.orthogonalize_`'s; the model is not changed.
    ``base_model`` (default: the model's ``name_or_path``) goes into ``adapter_config.json`` as
    ``base_model_name_or_path``; ``identity`` (default: the direction's ``model``) is the base model's identity
    (``sha256:…`` or ``hub:ID@COMMIT``), named in the model card and the safetensors header (and, for a hub commit,
    ``revision``). ``card`` is as for :func:`~refusal.export.hf.model_card` (``run`` is a detail). Raises
    :class:`RefusalError` for an existing ``out_dir`` without ``overwrite`` or an edit LoRA cannot hold, before
    anything is written."""
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    factors = lora_factors(model, direction_or_subspace, orthogonal_to_harmless=orthogonal_to_harmless,
                           layer_weights=layer_weights, norm_preserving=norm_preserving)
    if not factors:
        raise RefusalError("Every layer weight is 0, so the edit changes nothing.", "Give a non-zero layer weight.")
    rank = max(f.rank for f in factors)
    base = str(base_model or getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    identity = identity or getattr(direction_or_subspace, "model", "") or ""
    tensors = peft_state_dict(factors, rank, dtype)
    config = _peft_config(factors, rank, base, _hub_revision(base, identity))
    options: EditOptions = {"norm_preserving": False, "orthogonal_to_harmless": orthogonal_to_harmless,
               "layer_weights": layer_weights}
    how = _how(model, direction_or_subspace, residual_writers(model), options)
    how.pop("direction model", None)
    how = {"base model identity": identity or "unknown (no identity given)", **how}
    run = (card or {}).get("run")
    meta = {"format": "pt", "refusal.model_identity": identity, "refusal.base_model": base,
            "refusal.direction": json.dumps({k: v for k, v in _direction_info(direction_or_subspace).items()
                                             if k != "model"}),
            "refusal.run": str(run or "")}
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is find_parts(model).embed.weight
    n_params = sum(bool(f.parameter) for f in factors)
    readme = adapter_card(base, how, rank=rank, n_modules=len(factors) - n_params, n_parameters=n_params,
                          has_embedding=any(f.kind == "embedding" for f in factors), tied=tied,
                          adapter_bytes=adapter_bytes, merged_bytes=_merged_bytes(model), card=card)

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=meta)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme, encoding="utf-8")

    _atomic_save(out, overwrite, write)
    return out
