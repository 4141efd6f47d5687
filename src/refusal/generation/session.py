"""An interactive chat with a model whose refusal directions can be switched on and off between turns.

>>> chat = ChatSession(model, tok, RunFolder("runs/x").directions(), max_new_tokens=128)  # selected, 0, 1, ..., set
>>> for piece in chat.send("How do I pick a lock?"):     # streamed, greedy
...     print(piece, end="", flush=True)
>>> chat.ablate("0-2")           # project out the span of ranked directions 0, 1, 2 at every layer
>>> chat.add("0", coeff=-1.0)    # activation addition of direction 0 at its source layer (here: subtraction)
>>> without, with_ = chat.compare()   # the last user turn answered with and without, in one batched generate
>>> chat.off(); chat.reset()

A run made with ``select.keep_refusal`` (conditional method) saves a keep condition; with it (``condition=``) and
the gate on (:meth:`keep`), each user message is first routed by the condition, the message alone templated as the
run's prompts are: a message routed to keep is answered without the ablation (an addition stays on), one routed to
release with it, as the run's ``keep_refusal`` condition decodes its test prompts.

The conversation is a list of messages formatted with the tokenizer's chat template at every turn. Answers are
greedy. Streaming runs its own loop over a key/value cache and installs the intervention hooks around each forward
only, so no hook outlives a step, even if the caller stops reading. :meth:`compare` decodes both rows in one batch
through :func:`~refusal.generation.batched.generate` with a per-row :class:`~refusal.interventions.Plan`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..batching import Batching
from ..directions.base import Direction, parse_ranks
from ..errors import RefusalError
from ..interventions.hooks import Plan, ablation, addition, apply, token_phase
from ..interventions.scopes import Intervention

if TYPE_CHECKING:
    from ..directions.condition import KeepCondition
from ..models.head import keep_last
from ..models.parts import cache_kwarg, find_parts, model_device
from .batched import generate, greedy_config


@dataclass(frozen=True)
class Active:
    """One switched-on intervention and how to say it."""

    kind: str  # "ablate" | "add"
    names: tuple[str, ...]
    intervention: Intervention
    coeff: float = 1.0

    def describe(self) -> str:
        names = ",".join(self.names)
        return f"ablate {names} (all layers)" if self.kind == "ablate" else f"add {names} × {self.coeff:g}"


class ChatSession:
    """A conversation with one model, and the interventions currently on (at most one ablation, one addition)."""

    def __init__(self, model: Any, tokenizer: Any, directions: Mapping[str, Direction], system: str | None = None,
                 max_new_tokens: int = 256, *, batching: Batching | None = None,
                 condition: KeepCondition | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise RefusalError("The tokenizer has no chat template, so this is not a chat model.",
                               "Use an instruction-tuned model.")
        self.model, self.tokenizer = model, tokenizer
        self.directions = directions
        self._names = list(directions)  # DirectionSet's `in` raises on a missing name: test against the names
        self.system = system
        self.max_new_tokens = int(max_new_tokens)
        self.batching = batching if batching is not None else Batching()  # /compare's batch (an interactive CLI: quiet)
        self.messages: list[dict[str, str]] = []
        self._active: dict[str, Active] = {}
        self.condition = condition  # the run's keep-refusal condition, if any
        self.gate = False  # whether the condition routes each message (keep: no ablation)
        self.last_route: str | None = None  # "release" or "keep": the gate's decision on the last message
        parts = find_parts(model)
        for name, d in directions.items():
            try:
                d.check_model(parts.hidden_size, parts.n_layers)
            except RefusalError as exc:
                raise RefusalError(f"Direction '{name}': {exc.problem}", exc.fix) from None
        cfg = greedy_config(model, tokenizer, self.max_new_tokens)
        eos = cfg.eos_token_id
        self._eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        if tokenizer.eos_token_id is not None:
            self._eos.add(tokenizer.eos_token_id)

    # ---- interventions -------------------------------------------------------------------------------------------

    def resolve(self, spec: str) -> list[tuple[str, Direction]]:
        """Directions named by ``spec``: ranks (``0-2``, ``0,3,5``) or names (``selected``, ``set``), comma-joined."""
        spec = str(spec).strip()
        if not spec:
            raise RefusalError("No directions named.", "Name ranks like 0-2 or 0,3, or a name such as selected.")
        if not self._names:
            raise RefusalError("This chat has no directions loaded.",
                               "Start it on a run folder, or give a direction file (--direction FILE.safetensors).")
        if spec in self._names:
            return [(spec, self.directions[spec])]
        n_ranked = 0
        while str(n_ranked) in self._names:
            n_ranked += 1
        out: list[tuple[str, Direction]] = []
        for part in spec.split(","):
            part = part.strip()
            if part in self._names:
                names = [part]
            elif part == "set":  # the run's saved set (sets.safetensors): only after `refusal sets`
                raise RefusalError(f"No direction named 'set' (have: {', '.join(self._names) or 'none'}): no set "
                                   "was saved for this run's selection.",
                                   "Run `refusal sets RUN_DIR` (it saves the best set), then start the chat again.")
            elif part and not part.replace("-", "").isdigit():
                raise RefusalError(f"No direction named '{part}' (have: {', '.join(self._names) or 'none'}).",
                                   "Name ranks like 0-2, or one of those names.")
            else:
                names = [str(r) for r in parse_ranks(part, n_ranked)]
            out += [(n, self.directions[n]) for n in names if n not in {x for x, _ in out}]
        return out

    def ablate(self, spec: str) -> str:
        """Project out the (orthonormalised) span of the named directions at every layer, replacing any earlier
        ablation; returns the status line."""
        picked = self.resolve(spec)
        d = picked[0][1] if len(picked) == 1 else picked[0][1].stack(*(d for _, d in picked[1:]))
        self._active["ablate"] = Active("ablate", tuple(n for n, _ in picked), ablation(d, "all"))
        return self.status()

    def add(self, spec: str, coeff: float = 1.0) -> str:
        """Add ``coeff`` times one direction's raw vector at the input of its source layer (negative: subtract),
        replacing any earlier addition; returns the status line."""
        picked = self.resolve(spec)
        if len(picked) != 1:
            raise RefusalError(f"Activation addition takes one direction; '{spec}' names {len(picked)}.",
                               "Add a single direction, e.g. /add 0 --coeff 1.5.")
        name, d = picked[0]
        if d.layer is None or d.k != 1 or d.per_layer:
            raise RefusalError(f"Direction '{name}' is a subspace or has no source layer: it cannot be added.",
                               "Add one ranked direction (0, 1, ...), or ablate this one.")
        self._active["add"] = Active("add", (name,), addition(d, float(coeff)), float(coeff))
        return self.status()

    def off(self) -> str:
        self._active.clear()
        return self.status()

    def keep(self, on: bool) -> str:
        """Turn the keep-refusal gate on or off; returns the status line."""
        if on and self.condition is None:
            raise RefusalError("This chat has no keep-refusal condition.",
                               "Start it on a run made with --keep-refusal (the conditional method saves "
                               "keep_condition.safetensors in the run folder).")
        self.gate = bool(on)
        self.last_route = None
        return self.status()

    def route(self, text: str) -> bool:
        """Whether the keep condition routes the user message ``text`` to release (templated alone, with this chat's
        system prompt, as the run templates its prompts)."""
        from dataclasses import replace

        from ..directions.condition import route
        from ..templates import format_prompts, pre_instruction_length

        if self.condition is None:
            raise RefusalError("This chat has no keep-refusal condition.",
                               "Start it on a conditional keep-refusal run.")
        cond = replace(self.condition, skip=pre_instruction_length(self.tokenizer, self.system))
        prompt = format_prompts(self.tokenizer, [text], self.system)[0]
        return route(self.model, self.tokenizer, cond, [prompt], batch_size=1, description="",
                     batching=self.batching)[0]

    def turn_interventions(self, text: str) -> list[Intervention]:
        """The interventions a user message is answered under: all that are on, less the ablation where the gate is
        on and routes the message to keep (the decision is kept in :attr:`last_route`)."""
        if not self.gate or "ablate" not in self._active:
            return self.interventions
        release = self.route(text)
        self.last_route = "release" if release else "keep"
        return [a.intervention for k, a in self._active.items() if release or k != "ablate"]

    @property
    def interventions(self) -> list[Intervention]:
        return [a.intervention for a in self._active.values()]

    def status(self) -> str:
        """The interventions that are on, in words."""
        gate = ""
        if self.gate and self.condition is not None:
            gate = (f"; keep-refusal gate on (kept: {', '.join(self.condition.kept)}"
                    + (f"; last message routed to {self.last_route}" if self.last_route else "") + ")")
        if not self._active:
            return "intervention: none (baseline model)" + gate
        return "intervention: " + " + ".join(a.describe() for a in self._active.values()) + gate

    # ---- conversation --------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the interventions stay)."""
        self.messages.clear()

    def prompt(self, messages: list[dict[str, str]] | None = None) -> str:
        """The templated conversation, ending with the assistant's turn."""
        msgs = self.messages if messages is None else messages
        full = ([{"role": "system", "content": self.system}] if self.system else []) + list(msgs)
        return self.tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer (pieces of text) under the current interventions; the answer
        joins the conversation when the stream ends (or what was streamed of it, if the caller stops early)."""
        ivs = self.turn_interventions(text)  # before the message joins: a routing error loses nothing
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            for piece in self.stream(self.prompt(), ivs):
                pieces.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    @torch.no_grad()
    def stream(self, prompt: str, interventions: list[Intervention] | None = None) -> Iterator[str]:
        """Greedy decoding of one templated prompt, yielding the new text after every token."""
        model, tok = self.model, self.tokenizer
        plan = Plan.shared(model, interventions or [])
        dev = model_device(model)
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=dev)
        key = cache_kwarg(model)
        cache = None
        new: list[int] = []
        shown = ""
        step_input, ph = ids, "prompt"
        clock = token_phase(model)
        for _ in range(self.max_new_tokens):
            kwargs = {"use_cache": True, "logits_to_keep": keep_last(step_input.shape[1], dev)}
            if cache is not None:
                kwargs[key] = cache
            with apply(model, plan), clock.during(ph):
                out = model(input_ids=step_input, **kwargs)
            cache = getattr(out, key)
            nxt = int(out.logits[0, -1].argmax())
            if nxt in self._eos:
                break
            new.append(nxt)
            text = tok.decode(new, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(shown):  # wait for a whole UTF-8 character
                yield text[len(shown):]
                shown = text
            step_input, ph = torch.tensor([[nxt]], device=dev), "generated"

    def last_user_messages(self) -> list[dict[str, str]]:
        """The conversation up to and including its last user message."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "user":
                return self.messages[: i + 1]
        raise RefusalError("There is no user message to compare on yet.", "Type a message first, then /compare.")

    def compare(self) -> tuple[str, str]:
        """The last user message answered without and with the current interventions: ``(baseline, intervened)``,
        both rows decoded in one batched generate with a per-row plan."""
        if not self._active:
            raise RefusalError("No intervention is on, so there is nothing to compare.",
                               "Switch one on first (/ablate 0, /add 0 --coeff -1), then /compare.")
        msgs = self.last_user_messages()
        prompt = self.prompt(msgs)
        plan = Plan.rows(self.model, [[], self.turn_interventions(msgs[-1]["content"])])
        texts = generate(self.model, self.tokenizer, [prompt, prompt], max_new_tokens=self.max_new_tokens,
                         batch_size=2, plan=plan, description="Comparing", batching=self.batching)
        return texts[0], texts[1]
