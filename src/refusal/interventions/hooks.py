"""Interventions on a plain Hugging Face model, as context managers that always remove their hooks.

>>> with apply(model, [ablation(direction)]):          # any operator x scope, the same for every batch row
...     model.generate(...)
>>> with apply(model, Plan.rows(model, per_row_interventions)):   # one list of interventions per batch row
...     model(...)
>>> with ablate(model, direction):                      # shorthands used by scoring
...     ...
>>> with add(model, vector, layer=12, coeff=-1.0):
...     ...

An intervention list lowers to a :class:`Plan`: for each (layer, site, token phase), a few :class:`~.operators.Edit`
steps held as tensors, with a leading batch-row dimension when rows differ. Rows with nothing to do at a site get
zero tensors there (a no-op), so many conditions or candidates share one forward pass and one hook per site, and a
compiled decode step sees the same hooks whatever the interventions are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import RefusalError
from ..linalg import orthonormalize, unit_rows
from ..models.parts import find_parts, model_device, module_device
from .operators import Add, Edit, ProjectOut, Reflect, apply_edit
from .scopes import SITES, Intervention, Scope

if TYPE_CHECKING:
    from ..directions.base import Direction

PHASES = ("prompt", "generated")


class TokenPhase:
    """Which positions a model's next forwards read: ``"prompt"`` (the prefill) or ``"generated"`` (decode steps).

    Token-scoped interventions (``tokens: prompt`` or ``generated``) look it up at every forward. Each model has one
    (:func:`token_phase`), which generation sets: to ``"prompt"`` around the prefill, ``"generated"`` once the prompt
    has been read. The hooks :func:`apply` installs read the model's by default, so hooks a caller installs around
    :func:`~refusal.generation.batched.generate` (``with apply(model, [...]): generate(...)``) follow its prefill and
    decode steps exactly as the hooks generate installs itself. ``apply(..., phase=TokenPhase())`` gives hooks a phase
    of their own, which only the caller sets."""

    def __init__(self, name: str = "prompt"):
        self.name = _checked(name)

    def set(self, name: str) -> None:
        self.name = _checked(name)

    @contextmanager
    def during(self, name: str) -> Iterator[TokenPhase]:
        """The phase is ``name`` inside the block, and what it was before after it (also on error)."""
        old, self.name = self.name, _checked(name)
        try:
            yield self
        finally:
            self.name = old

    def __repr__(self) -> str:
        return f"TokenPhase({self.name!r})"


def _checked(name: str) -> str:
    if name not in PHASES:
        raise ValueError(f"a token phase is one of {PHASES}, not {name!r}")
    return name


def token_phase(model: nn.Module) -> TokenPhase:
    """The model's token phase (made on first use and kept with its decoder layers, so the causal-LM wrapper and
    its inner model share one)."""
    layers = find_parts(model).layers
    ph = layers.__dict__.get("_refusal_token_phase")
    if ph is None:
        ph = layers.__dict__["_refusal_token_phase"] = TokenPhase()
    return ph


def phase(model: nn.Module, name: str) -> AbstractContextManager[TokenPhase]:
    """Context manager: ``model``'s forwards inside the block read the prompt (``"prompt"``) or generate
    (``"generated"``), for token-scoped interventions; :meth:`TokenPhase.during` on :func:`token_phase`."""
    return token_phase(model).during(name)


# ---- constructors for the common interventions ----------------------------------------------------------------


def ablation(direction: torch.Tensor | Direction, layers: Any = "all", tokens: str = "all") -> Intervention:
    """Directional ablation (the paper): project out at the input and both block outputs of every layer."""
    vecs, source = _vectors(direction)
    return Intervention(ProjectOut(vecs), Scope(layers, SITES, tokens), source)


def addition(direction: torch.Tensor | Direction, coeff: float = 1.0, layers: Any = "source",
             tokens: str = "all") -> Intervention:
    """Activation addition of the raw vector at the input of its source layer (the paper), or other layers."""
    vecs, source = _vectors(direction)
    if vecs.ndim != 1 and vecs.shape[0] != 1:
        raise RefusalError("Activation addition takes one direction, not a subspace.",
                           "Add a single direction (e.g. INLP's first, rescaled), or use reflection.")
    return Intervention(Add(vecs.reshape(-1), coeff), Scope(layers, ("input",), tokens), source)


def reflection(direction: torch.Tensor | Direction, alpha: float = 1.0, layers: Any = "source",
               tokens: str = "all") -> Intervention:
    """Counterfactual reflection across the hyperplane orthogonal to the direction (or subspace)."""
    vecs, source = _vectors(direction)
    return Intervention(Reflect(vecs, alpha), Scope(layers, ("input",), tokens), source)


def _vectors(direction: torch.Tensor | Direction) -> tuple[torch.Tensor, int | None]:
    if isinstance(direction, torch.Tensor):
        return direction, None
    return direction.vectors, direction.layer  # a refusal.directions.base.Direction


# ---- plans -------------------------------------------------------------------------------------------------------

# (basis | None, coeffs | None, shift | None), each with a leading row dim when per row
Step = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


@dataclass
class Plan:
    """Edit steps per (layer, site, phase); ``n_rows`` is None when every row gets the same edits."""

    steps: dict[tuple[int, str, str], list[Step]]
    n_rows: int | None = None

    @classmethod
    def shared(cls, model: nn.Module, interventions: Sequence[Intervention]) -> Plan:
        """The same interventions on every row."""
        n_layers = find_parts(model).n_layers
        steps: dict = {}
        for iv in interventions:
            edits = iv.operator.edits()
            for key in _keys(iv, n_layers):
                steps.setdefault(key, []).extend((e.basis, e.coeffs, e.shift) for e in edits)
        return cls(steps, None)

    @classmethod
    def rows(cls, model: nn.Module, rows: Sequence[Sequence[Intervention]]) -> Plan:
        """One list of interventions per batch row (an empty list: no intervention on that row)."""
        parts = find_parts(model)
        n, d = len(rows), parts.hidden_size
        per_key: dict[tuple, dict[int, list[Edit]]] = {}
        lowered: dict[int, list[Edit]] = {}
        for r, ivs in enumerate(rows):
            for iv in ivs:
                edits = lowered.setdefault(id(iv), iv.operator.edits())
                for key in _keys(iv, parts.n_layers):
                    per_key.setdefault(key, {}).setdefault(r, []).extend(edits)
        steps: dict = {}
        tables: dict = {}  # identical row patterns share one tensor (e.g. ablation at every site)
        for key, by_row in per_key.items():
            sig = tuple(sorted((r, tuple(id(e) for e in es)) for r, es in by_row.items()))
            if sig not in tables:
                tables[sig] = _stack(by_row, n, d)
            steps[key] = tables[sig]
        return cls(steps, n)

    def take(self, rows: torch.Tensor | Sequence[int]) -> Plan:
        """The plan for a subset of rows (e.g. one generation batch)."""
        if self.n_rows is None:
            return self
        idx = torch.as_tensor(rows, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, idx.to(t.device)), len(idx))

    def row_groups(self, phase: str = "prompt") -> tuple[torch.Tensor, list[int]]:
        """Rows whose edits in ``phase`` are identical, as ``(group of each row, one row of each group)``: a forward
        that only ``phase`` sees (a shared prompt prefix) needs running once per group, not once per row. Only for a
        per-row plan (a shared plan has one group by definition)."""
        if self.n_rows is None:
            raise ValueError("row_groups needs a per-row plan (Plan.rows); a shared plan is one group")
        seen: dict[int, torch.Tensor] = {}
        for (_layer, _site, ph), st in self.steps.items():
            if ph == phase:
                for t in (x for step in st for x in step if x is not None):
                    seen.setdefault(id(t), t)
        if not seen:
            return torch.zeros(self.n_rows, dtype=torch.long), [0]
        rows = torch.cat([t.reshape(self.n_rows, -1).float().cpu() for t in seen.values()], 1)
        _, groups = torch.unique(rows, dim=0, return_inverse=True)
        first: dict[int, int] = {}
        for r, g in enumerate(groups.tolist()):
            first.setdefault(g, r)
        return groups, [first[g] for g in range(len(first))]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Plan:
        return self._map(lambda t: t.to(device=device, dtype=dtype), self.n_rows)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], n_rows: int | None) -> Plan:
        """``fn`` applied to every tensor once (tables shared between sites stay shared)."""
        memo: dict[int, torch.Tensor] = {}

        def one(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is not None and id(t) not in memo:
                memo[id(t)] = fn(t)
            return None if t is None else memo[id(t)]
        done: dict = {}
        steps = {}
        for key, st in self.steps.items():
            if id(st) not in done:
                done[id(st)] = [tuple(one(t) for t in step) for step in st]
            steps[key] = done[id(st)]
        return Plan(steps, n_rows)


def _keys(iv: Intervention, n_layers: int) -> Iterable[tuple[int, str, str]]:
    phases = PHASES if iv.scope.tokens == "all" else (iv.scope.tokens,)
    for layer in iv.layers(n_layers):
        for site in iv.scope.sites:
            for ph in phases:
                yield layer, site, ph


def _stack(by_row: dict[int, list[Edit]], n: int, d: int) -> list[Step]:
    """Per-row tensors for each step: rows without a step there get zeros (no change)."""
    depth = max(len(es) for es in by_row.values())
    out = []
    for j in range(depth):
        here = {r: es[j] for r, es in by_row.items() if len(es) > j}
        k = max((e.basis.shape[0] for e in here.values() if e.basis is not None), default=0)
        basis: torch.Tensor | None = None
        coeffs: torch.Tensor | None = None
        shift: torch.Tensor | None = None
        if k:
            basis, coeffs = torch.zeros(n, k, d), torch.zeros(n, k)
        if any(e.shift is not None for e in here.values()):
            shift = torch.zeros(n, d)
        for r, e in here.items():
            if e.basis is not None:
                assert basis is not None and coeffs is not None and e.coeffs is not None  # k > 0 here
                basis[r, :e.basis.shape[0]] = e.basis
                coeffs[r, :e.basis.shape[0]] = e.coeffs
            if e.shift is not None:
                assert shift is not None  # made above: a row has a shift here
                shift[r] = e.shift
        out.append((basis, coeffs, shift))
    return out


# ---- installing hooks ------------------------------------------------------------------------------------------


def _edit_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    return fn(output)


def _edit_input(args: tuple, kwargs: dict[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple[tuple, dict[str, Any]]:
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fn(kwargs["hidden_states"])
    return args, kwargs


@contextmanager
def _hooks(register: Iterable) -> Iterator[None]:
    handles = []
    try:
        for h in register:
            handles.append(h())
        yield
    finally:
        for h in handles:
            h.remove()


def _device_of(module: nn.Module, fallback: torch.device) -> torch.device:
    return module_device(module, fallback)  # accelerate's execution device when a device map placed it


@contextmanager
def apply(model: nn.Module, plan: Plan | Sequence[Intervention], *,
          phase: TokenPhase | None = None) -> Iterator[Plan]:
    """Install a plan's hooks (a list of interventions means the same for every row); removed on exit.

    Token-scoped steps act in the phase that ``phase`` names at each forward: by default the model's own
    (:func:`token_phase`), which generation sets."""
    parts = find_parts(model)
    clock = token_phase(model) if phase is None else phase
    if not isinstance(plan, Plan):
        plan = Plan.shared(model, list(plan))
    dtype = parts.embed.weight.dtype
    fallback = model_device(model)
    by_site: dict[tuple[int, str], dict[str, list[Step]]] = {}
    for (layer, site, ph), st in plan.steps.items():
        by_site.setdefault((layer, site), {})[ph] = st
    on_device: dict = {}

    def plan_on(dev: torch.device) -> Plan:
        if dev not in on_device:
            on_device[dev] = plan.to(dev, dtype)
        return on_device[dev]

    regs = []
    for (layer, site), tables in by_site.items():
        dev = _device_of(parts.layers[layer], fallback)
        local = {ph: plan_on(dev).steps[(layer, site, ph)] for ph in tables}

        def fn(x: torch.Tensor, local: dict[str, list[Step]] = local, dev: torch.device = dev,
               key: tuple[int, str] = (layer, site)) -> torch.Tensor:
            ph = clock.name
            st = local.get(ph)
            if st is None:
                return x
            if x.device != dev:  # a model split by a device map: a layer's input arrives from the previous device
                st = plan_on(x.device).steps[key + (ph,)]
            for basis, coeffs, shift in st:
                if basis is not None and basis.dtype != x.dtype:  # a forward in another dtype (rare)
                    assert coeffs is not None  # a step's basis has its coefficients
                    basis, coeffs = basis.to(x.dtype), coeffs.to(x.dtype)
                if shift is not None and shift.dtype != x.dtype:
                    shift = shift.to(x.dtype)
                x = apply_edit(x, basis, coeffs, shift)
            return x

        if site == "input":
            regs.append(lambda m=parts.layers[layer], f=fn: m.register_forward_pre_hook(
                lambda _m, a, k: _edit_input(a, k, f), with_kwargs=True))
        else:
            block = parts.attn[layer] if site == "attn" else parts.mlp[layer]
            regs.append(lambda m=block, f=fn: m.register_forward_hook(lambda _m, _a, out: _edit_output(out, f)))
    with _hooks(regs):
        yield plan


# ---- shorthands (the hot paths of scoring build their tables directly) -----------------------------------------


def _layer_list(n: int, layers: int | Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        return [layers]
    return list(layers)


def ablate(model: nn.Module, direction: torch.Tensor, *, layers: Iterable[int] | None = None,
           per_row: bool = False) -> AbstractContextManager[Plan]:
    """Directional ablation at the input and both block outputs of the given layers (default: all).

    ``direction`` is ``(d,)``, ``(k, d)`` (a subspace, orthonormalised here), or with ``per_row=True`` ``(B, d)``:
    one direction per batch row."""
    parts = find_parts(model)
    d = direction.float()
    step: Step
    if per_row:
        basis = unit_rows(d)[:, None, :]
        step = (basis, torch.ones(basis.shape[:2], device=d.device), None)
    else:
        basis = orthonormalize(d)
        step = (basis, torch.ones(basis.shape[0], device=d.device), None)
    steps: dict[tuple[int, str, str], list[Step]] = {
        (i, s, ph): [step] for i in _layer_list(parts.n_layers, layers) for s in SITES for ph in PHASES}
    return apply(model, Plan(steps, len(d) if per_row else None))


def add(model: nn.Module, vector: torch.Tensor, layer: int, *, coeff: float = 1.0,
        per_row: bool = False) -> AbstractContextManager[Plan]:
    """Activation addition: ``coeff * vector`` added at the input of ``layer``, every position (the raw vector, as
    in Arditi et al.). With ``per_row=True`` ``vector`` is ``(B, d)``: one vector per batch row."""
    v = coeff * vector.float()
    step: Step = (None, None, v)
    steps: dict[tuple[int, str, str], list[Step]] = {(layer, "input", ph): [step] for ph in PHASES}
    return apply(model, Plan(steps, len(v) if per_row else None))


def project_out(x: torch.Tensor, basis: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """``x`` minus its component in the span of ``basis`` (rows orthonormal; per row: ``(B, d)`` unit rows)."""
    b = basis.to(x.dtype)
    if per_row:
        b = b[:, None, :]
    return apply_edit(x, b, torch.ones(b.shape[:-1], dtype=x.dtype, device=x.device), None)
