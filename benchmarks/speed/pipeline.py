"""Speed of the refusal pipeline's stages on one GPU, against naive plain-transformers baselines.

    python -m benchmarks.speed.pipeline --arch llama3-8b          # random bf16 weights, built on the GPU in seconds
    python -m benchmarks.speed.pipeline --model /path/to/hf-folder
    python -m benchmarks.speed.pipeline --arch tiny               # CPU smoke test
    python -m benchmarks.speed.pipeline --arch llama3-70b --device-map auto   # 70B shape spread over the visible GPUs

Speed does not depend on weight values, so the model is built from a config with random weights, and prompts are
random token ids fed through a stand-in tokenizer (:class:`IdTokenizer`) that maps the strings ``"p0"``, ``"p1"``,
... to precomputed id lists. Stages timed (each between ``synchronize`` calls, after a warm-up):

1. extraction: :func:`refusal.directions.diff_means.extract` on 128 + 128 prompts, 5 positions;
2. selection: :func:`refusal.scoring.engine.score_candidates` over every layer x 5 positions with 32 + 32 validation
   prompts,
   against a naive loop (three plain ``model(...)`` forwards per candidate, full logits), timed on a few candidates
   and extrapolated;
3. generation under ablation: :func:`refusal.interventions.weights.orthogonalized` +
   :func:`refusal.generation.batched.generate` at
   batch 64 and 16 x 128 new tokens, static and default (dynamic) cache, against ``model.generate`` with hook-based
   ablation and the default cache; each timed as the median of ``--gen-repeats`` calls after a warm-up, ms per step =
   (call - prefill) / (new tokens - 1), the prefill timed apart as a one-new-token call.

Results go to ``benchmarks/results/<device>.json`` (``<device>-70b.json`` for ``llama3-70b``; rewritten after every
stage, so a run cut short keeps what it measured) and to a table on stdout. See benchmarks/README.md for what each
number means.

With ``--device-map`` the model is built on the meta device, each weight is then created (random) directly on the
device the map gives it, and accelerate's ``dispatch_model`` adds the hooks that move activations between devices:
``auto`` balances the layers over the visible GPUs (each GPU's budget is its free memory times
``--max-memory-fraction``), a comma list (``0,1``; ``cpu,disk`` for a CPU smoke test of the code path) splits the
layers evenly in that order. Peak memory per GPU is recorded for every stage.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import statistics
import sys
import time
from contextlib import ExitStack, nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"

ARCHS: dict[str, tuple[str, dict]] = {
    "llama3-8b": ("llama", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2.5-7b": ("qwen2", dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)),
    "llama3-70b": ("llama", dict(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "tiny": ("llama", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)),
}

# tokens of each arch's chat-template opening before the instruction, shared by every prompt: Llama-3-Instruct's
# "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"; Qwen2.5-Instruct's default system prompt
# ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n") plus
# "<|im_start|>user\n", 24 tokens with its tokenizer
TEMPLATE_OPENING = {"llama3-8b": 5, "llama3-70b": 5, "qwen2.5-7b": 24, "tiny": 5}
OUT_SUFFIX = {"llama3-70b": "-70b"}  # results file: benchmarks/results/<device><suffix>.json

# HBM bandwidth in TB/s, matched in order against the lower-cased device name
HBM_TBPS: list[tuple[str, float, str]] = [
    ("h100 pcie", 2.0, "H100 PCIe"),
    ("h100 nvl", 3.9, "H100 NVL"),
    ("h100", 3.35, "H100 SXM"),
    ("gh200", 4.0, "GH200 (HBM3)"),
    ("h200", 4.8, "H200"),
    ("b200", 8.0, "B200"),
    ("a100-sxm4-80gb", 2.039, "A100 SXM 80GB"),
    ("a100 80gb", 1.935, "A100 PCIe 80GB"),
    ("a100", 1.555, "A100 40GB"),
    ("l40s", 0.864, "L40S"),
    ("a10g", 0.6, "A10G"),
    ("4090", 1.008, "RTX 4090"),
]

PAD_ID = 0
FIRST_ID = 100  # prompt ids are drawn from [FIRST_ID, vocab)


# ----------------------------------------------------------------------------------------------------------------
# Stand-in tokenizer


class IdTokenizer:
    """Maps the prompt strings it was built with to fixed id lists; only what refusal's functions call.

    ``refusal.templates.tokenize`` calls ``tok(list, return_tensors="pt", padding=True, add_special_tokens=False)``;
    ``refusal.generation.batched.generate`` calls ``tok(list, add_special_tokens=False)["input_ids"]``, ``batch_decode``
    and
    (in ``greedy_config``) reads ``eos_token_id`` and ``pad_token_id``.
    """

    padding_side = "left"

    def __init__(self, table: dict[str, list[int]], pad_token_id: int = PAD_ID, eos_token_id: int | None = None):
        self.table = table
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.decoded_lengths: list[int] = []  # new tokens per batch_decode call: checks that nothing stopped early

    def __call__(self, text, return_tensors: str | None = None, padding: bool | str = False,
                 add_special_tokens: bool = False, **_):
        single = isinstance(text, str)
        ids = [self.table[t] for t in ([text] if single else text)]
        if return_tensors is None:
            return {"input_ids": ids[0] if single else ids,
                    "attention_mask": [[1] * len(x) for x in ids] if not single else [1] * len(ids[0])}
        if return_tensors != "pt":
            raise ValueError(f"IdTokenizer supports return_tensors='pt' only, not {return_tensors!r}")
        width = max(len(x) for x in ids)
        if not padding and any(len(x) != width for x in ids):
            raise ValueError("sequences of different lengths need padding=True")
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            if x:
                input_ids[i, width - len(x):] = torch.tensor(x)
                mask[i, width - len(x):] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **_):
        rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else [list(s) for s in sequences]
        self.decoded_lengths.append(len(rows[0]) if rows else 0)
        return [" ".join(map(str, r)) for r in rows]

    def decode(self, ids, skip_special_tokens: bool = False, **_):
        return self.batch_decode([ids])[0]


def make_prompts(rng: random.Random, name: str, n: int, vocab: int, lengths, opening: list[int],
                 suffix: list[int]) -> dict[str, list[int]]:
    """``n`` fake templated prompts: the template's opening (the same ids in every prompt), random instruction ids,
    then the fixed post-instruction suffix. ``lengths`` draws an instruction length."""
    out = {}
    for i in range(n):
        body = [rng.randrange(FIRST_ID, vocab) for _ in range(max(1, lengths()))]
        out[f"{name}{i}"] = opening + body + suffix
    return out


def length_sampler(args, rng: random.Random, kind: str):
    """Instruction lengths: drawn from the built-in sets' real lengths (``builtin``), or uniform (``uniform``,
    whole prompt between --min-len and --max-len tokens, template included)."""
    if args.lengths == "uniform":
        fixed = args.prefix_len + args.n_positions
        return lambda: rng.randint(args.min_len, args.max_len) - fixed
    table = json.loads((Path(__file__).resolve().parents[1] / "data" / "instruction_lengths.json").read_text())
    pool = table["harmful" if kind == "harmful" else "harmless"]
    return lambda: rng.choice(pool)


def padded_tokens(lengths: list[int], batch: int) -> int:
    """Tokens of a left-padded pass over ``lengths``, ``batch`` at a time in order, padding included."""
    return sum(len(c) * max(c) for c in (lengths[i:i + batch] for i in range(0, len(lengths), batch)))


# ----------------------------------------------------------------------------------------------------------------
# Model


def build_model(args, device: torch.device, dtype: torch.dtype):
    """A model with random weights (or the real one with ``--model``), eval mode, no grad, nothing stopping early."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if getattr(args, "device_map", None):
        model, name = build_dispatched(args, dtype)
    elif args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        model.to(device)
        name = args.model
    else:
        family, kw = ARCHS[args.arch]
        cfg = AutoConfig.for_model(family, **kw)
        cfg.bos_token_id = cfg.eos_token_id = None
        cfg.pad_token_id = PAD_ID
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers: let it initialise (on the device, so still fast)
            no_init_weights = nullcontext
        torch.manual_seed(args.seed)
        with torch.device(device), no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.02)
                elif "norm" in pname:
                    p.fill_(1.0)
                else:
                    p.zero_()
        name = args.arch
    return _quiet_greedy(model), name


def _quiet_greedy(model):
    model.eval()
    model.requires_grad_(False)
    # no stop token: every sequence runs the full max_new_tokens (generate fills unset values from here)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
        model.generation_config.pad_token_id = PAD_ID
        for k in ("do_sample", "temperature", "top_p", "top_k"):  # plain greedy, no warnings about sampling flags
            if hasattr(model.generation_config, k):
                setattr(model.generation_config, k, None if k != "do_sample" else False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# A model split across devices


def _placement(model) -> list[tuple[str, str]]:
    """The model's placement units in order: ``(name, role)`` with role ``first`` (the input embedding and anything
    else before the layers), ``layer``, or ``last`` (final norm, output head, ...)."""
    from refusal.models.parts import find_parts

    parts = find_parts(model)
    names = {id(m): n for n, m in model.named_modules()}
    layers_name = names[id(parts.layers)]
    embed_name = names[id(parts.embed)]
    out: list[tuple[str, str]] = []

    def walk(module, prefix):
        for child_name, child in module.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            if full == layers_name:
                out.extend((f"{full}.{i}", "layer") for i in range(len(child)))
            elif layers_name.startswith(full + "."):
                walk(child, full)
            else:
                out.append((full, "first" if full == embed_name else "last"))
    walk(model, "")
    return out


def even_device_map(model, devices: list) -> dict:
    """Decoder layers split into ``len(devices)`` consecutive runs of (nearly) equal length; the input embedding with
    the first run, the final norm, output head and the rest with the last."""
    units = _placement(model)
    n = sum(1 for _, role in units if role == "layer")
    k = len(devices)
    dmap, i = {}, 0
    for name, role in units:
        if role == "layer":
            dmap[name] = devices[min(k - 1, i * k // n)]
            i += 1
        else:
            dmap[name] = devices[0] if role == "first" else devices[-1]
    return dmap


def _parse_devices(spec: str) -> list:
    return [int(x) if x.strip().isdigit() else x.strip() for x in spec.split(",") if x.strip()]


def device_map_for(model, spec: str, dtype: torch.dtype, fraction: float) -> tuple[dict, dict | None]:
    """``(device_map, max_memory)`` for ``--device-map``: ``auto``/``balanced``: accelerate's balanced map over the
    visible GPUs, each allowed ``fraction`` of its free memory (all on the CPU without a GPU); a comma list: the
    layers split evenly over those devices in order."""
    from refusal.models.loading import max_memory_map

    if spec not in ("auto", "balanced"):
        return even_device_map(model, _parse_devices(spec)), None
    if not torch.cuda.is_available():
        return even_device_map(model, ["cpu"]), None
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    budget = max_memory_map(fraction, cpu=False)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype,
                                   low_zero=False)
    dmap = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    off = sorted({str(v) for v in dmap.values() if v in ("cpu", "disk")})
    if off:
        raise SystemExit(f"the model does not fit on the GPUs at --max-memory-fraction {fraction} (free memory "
                         f"{ {k: round(v / 2**30, 1) for k, v in budget.items()} } GiB): {off} would be used")
    return dmap, budget


def _unit_device(dmap: dict, name: str):
    best = max((k for k in dmap if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise KeyError(f"{name} is not in the device map")
    return dmap[best]


def build_dispatched(args, dtype: torch.dtype):
    """A model split by ``--device-map``: built on the meta device, each weight then created with random values
    directly on its device (so a 70B model never passes through host memory), and dispatched by accelerate."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    from refusal.models.loading import load_model

    if args.model:
        model, _ = load_model(args.model, dtype=dtype, device_map=args.device_map,
                              max_memory_fraction=args.max_memory_fraction, offload_folder=args.offload_folder)
        args.resolved_device_map = dict(getattr(model, "hf_device_map", {}) or {})
        return model, args.model
    family, kw = ARCHS[args.arch]
    cfg = AutoConfig.for_model(family, **kw)
    cfg.bos_token_id = cfg.eos_token_id = None
    cfg.pad_token_id = PAD_ID
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real, on the CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    dmap, budget = device_map_for(model, args.device_map, dtype, args.max_memory_fraction)
    torch.manual_seed(args.seed)
    for pname, p in list(model.named_parameters()):
        dev = _unit_device(dmap, pname)
        dev = "cpu" if dev == "disk" else dev  # dispatch_model writes these to the offload folder
        t = torch.empty(p.shape, dtype=dtype, device=dev)
        if p.ndim >= 2:
            t.normal_(0.0, 0.02)
        elif "norm" in pname:
            t.fill_(1.0)
        else:
            t.zero_()
        set_module_tensor_to_device(model, pname, dev, value=t)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    offload = args.offload_folder
    if "disk" in dmap.values() and offload is None:
        import tempfile

        offload = tempfile.mkdtemp(prefix="refusal-offload-")
    model = dispatch_model(model, device_map=dmap, offload_dir=offload, force_hooks=True)
    args.resolved_device_map = dmap
    args.resolved_max_memory = budget
    return model, args.arch


def device_map_summary(model, dmap: dict) -> dict:
    """Layers per device, where the embedding and the head are, and the weight bytes each device holds."""
    from refusal.models.parts import find_parts

    parts = find_parts(model)
    names = {id(m): n for n, m in model.named_modules()}
    layer_dev = [str(_unit_device(dmap, names[id(layer)])) for layer in parts.layers]
    per_dev: dict[str, list[int]] = {}
    for i, d in enumerate(layer_dev):
        per_dev.setdefault(d, []).append(i)
    weight_bytes: dict[str, int] = {}
    for pname, p in model.named_parameters():
        d = str(_unit_device(dmap, pname))
        weight_bytes[d] = weight_bytes.get(d, 0) + p.numel() * p.element_size()
    head = model.get_output_embeddings()
    return {"layers": {d: [ids[0], ids[-1]] for d, ids in per_dev.items()},
            "n_layers": {d: len(ids) for d, ids in per_dev.items()},
            "embed": str(_unit_device(dmap, names[id(parts.embed)])),
            "lm_head": None if head is None else str(_unit_device(dmap, names[id(head)])),
            "weight_bytes": weight_bytes}


def gpu_memory(peak: bool = True) -> list[int] | None:
    """Peak (or current) bytes allocated by torch on every visible GPU; None without one."""
    if not torch.cuda.is_available():
        return None
    f = torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated
    return [int(f(i)) for i in range(torch.cuda.device_count())]


def reset_gpu_peaks() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def weight_stats(model) -> dict:
    from refusal.models.parts import find_parts

    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    total_bytes = sum(p.numel() * p.element_size() for p in params)
    embed = find_parts(model).embed.weight
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is embed
    # a decode step reads every weight once except the input embedding table (one row per sequence), unless tied
    step_bytes = total_bytes - (0 if tied else embed.numel() * embed.element_size())
    return {"n_params": n_params, "weight_bytes": total_bytes, "decode_step_weight_bytes": step_bytes,
            "tied_embeddings": tied}


# ----------------------------------------------------------------------------------------------------------------
# Timing helpers


class Clock:
    def __init__(self, device: torch.device, all_devices: bool = False):
        self.cuda = device.type == "cuda"
        self.devices = list(range(torch.cuda.device_count())) if self.cuda and all_devices else [None]

    def sync(self):
        if self.cuda:
            for d in self.devices:  # a model split over GPUs: wait for every one of them
                torch.cuda.synchronize(d)

    def time(self, fn):
        """``(seconds, result)`` of ``fn()``, synchronised on both sides."""
        self.sync()
        t = time.perf_counter()
        r = fn()
        self.sync()
        return time.perf_counter() - t, r


def device_info(device: torch.device, hbm_tbps: float | None) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        low = name.lower()
        m = re.search(r"\b([a-z]{1,3}\d{2,4}[a-z]?)\b", low.replace("nvidia", ""))
        slug = m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", low).strip("-")
        if hbm_tbps is not None:
            bw, src = hbm_tbps, "--hbm-tbps"
        else:
            hit = next(((b, label) for key, b, label in HBM_TBPS if key in low), None)
            bw, src = (hit[0], f"default for {hit[1]}") if hit else (None, "unknown device: pass --hbm-tbps")
        return {"device": slug, "device_name": name, "hbm_tbps": bw, "hbm_tbps_source": src}
    return {"device": device.type, "device_name": platform.processor() or platform.machine() or device.type,
            "hbm_tbps": hbm_tbps, "hbm_tbps_source": "--hbm-tbps" if hbm_tbps else "n/a (not a GPU)"}


def tflops(n_params: int, tokens: int, seconds: float) -> float | None:
    return None if not seconds else 2.0 * n_params * tokens / seconds / 1e12


def rnd(x, nd=4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


# ----------------------------------------------------------------------------------------------------------------
# Naive baselines


@torch.no_grad()
def naive_select(model, tok, clock, units, diffs, cand, hv, bv, rids, n_timed: int) -> dict:
    """The straightforward way: per candidate, three plain forwards with full logits, last position taken after."""
    from refusal.interventions.hooks import ablate, add
    from refusal.scoring.engine import kl_div
    from refusal.scoring.refusal import refusal_score
    from refusal.templates import tokenize

    dev = units.device
    h = tokenize(tok, hv, dev)
    b = tokenize(tok, bv, dev)

    def fwd(batch):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1, :]

    def baseline():
        base_h = refusal_score(fwd(h), rids).mean().item()
        base_logp = torch.log_softmax(fwd(b).float(), -1)
        return base_h, base_logp

    def one(p, layer, base_logp):
        with ablate(model, units[p, layer]):
            bypass = refusal_score(fwd(h), rids).mean().item()
            kl = kl_div(base_logp, torch.log_softmax(fwd(b).float(), -1)).mean().item()
        with add(model, diffs[p, layer], layer):
            induce = refusal_score(fwd(b), rids).mean().item()
        return bypass, kl, induce

    _, (_, base_logp) = clock.time(baseline)  # warm-up
    one(*cand[0], base_logp)
    base_s, (_, base_logp) = clock.time(baseline)
    step = max(1, len(cand) // n_timed)
    subset = cand[::step][:n_timed]
    t, _ = clock.time(lambda: [one(p, layer, base_logp) for p, layer in subset])
    per = t / len(subset)
    return {"select_naive_s": base_s + per * len(cand), "select_naive_timed_s": t + base_s,
            "naive_candidates_timed": len(subset), "select_naive_per_candidate_s": per,
            "select_naive_baseline_s": base_s}


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed.pipeline", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--arch", choices=sorted(ARCHS), default="llama3-8b", help="random-weight model to build")
    src.add_argument("--model", help="a local Hugging Face model folder instead of random weights")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--device-map", default=None,
                    help="split the model across devices through accelerate: auto (balanced over the visible GPUs) "
                         "or a comma list of devices the layers are split over evenly (0,1; cpu,disk: CPU smoke test)")
    ap.add_argument("--max-memory-fraction", type=float, default=0.9,
                    help="with --device-map auto: share of each GPU's free memory the weights may take")
    ap.add_argument("--offload-folder", default=None, help="with 'disk' in --device-map: where offloaded weights go")
    ap.add_argument("--select-stride", type=int, default=1,
                    help="score every k-th layer only (all positions), to fit a large model's run in a time limit")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--n-train", type=int, default=128, help="harmful and harmless prompts each, for extraction")
    ap.add_argument("--n-val", type=int, default=32, help="harmful and harmless validation prompts each, for selection")
    ap.add_argument("--n-positions", type=int, default=5, help="post-instruction positions (fixed template suffix)")
    ap.add_argument("--lengths", choices=["builtin", "uniform"], default="builtin",
                    help="instruction lengths: the built-in sets' real ones (Qwen2.5 tokenizer), or uniform")
    ap.add_argument("--min-len", type=int, default=40, help="with --lengths uniform: shortest prompt, in tokens")
    ap.add_argument("--max-len", type=int, default=56, help="with --lengths uniform: longest prompt, in tokens")
    ap.add_argument("--prefix-len", type=int, default=None,
                    help="tokens of the template's opening, shared by every prompt (default: the arch's template)")
    ap.add_argument("--extract-batch", type=int, default=64, help="prompts per forward in extraction (as refusal run)")
    ap.add_argument("--select-batch", type=int, default=4096, help="sequences per forward in score_candidates")
    ap.add_argument("--sweep-select-batch", default="2048,4096,8192",
                    help="comma list of --select-batch values to time on a few layers ('' to skip)")
    ap.add_argument("--sweep-layers", type=int, default=4, help="layers scored in each sweep point")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per generated sequence")
    ap.add_argument("--gen-batches", default="64,16", help="generation batch sizes (the first is the headline)")
    ap.add_argument("--gen-repeats", type=int, default=3,
                    help="timed generation calls per batch size and cache (their median is reported)")
    ap.add_argument("--no-static", action="store_true", help="skip static-cache generation (torch.compile)")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive baselines")
    ap.add_argument("--naive-candidates", type=int, default=16, help="candidates timed in the naive selection loop")
    ap.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth in TB/s (default: from device name)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the optional select-batch sweep when the run has used this many seconds")
    ap.add_argument("--cpu-threads", type=int, default=1, help="torch threads on CPU (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true", help="show refusal's progress bars")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<device>.json)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import transformers
    from rich.console import Console
    from rich.table import Table

    from refusal.batching import Batching
    from refusal.directions.diff_means import extract
    from refusal.errors import RefusalError
    from refusal.generation.batched import generate
    from refusal.generation.static import StaticDecoder
    from refusal.interventions.hooks import ablate
    from refusal.interventions.weights import orthogonalized
    from refusal.scoring.engine import score_candidates

    console = Console()
    if not console.is_terminal:  # captured output: keep the table on one line per row
        console = Console(width=160)
    batching = Batching(quiet=not args.progress)  # passed to every refusal call below
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if device.type == "cpu" and args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    clock = Clock(device, all_devices=bool(args.device_map))
    dinfo = device_info(device, args.hbm_tbps)
    suffix = "" if args.model else OUT_SUFFIX.get(args.arch, "")
    out_path = Path(args.out) if args.out else RESULTS_DIR / f"{dinfo['device']}{suffix}.json"
    gen_batches = [int(x) for x in args.gen_batches.split(",") if x.strip()]
    sweep = [int(x) for x in args.sweep_select_batch.split(",") if x.strip()]
    bw_note = (f"{dinfo['hbm_tbps']} TB/s ({dinfo['hbm_tbps_source']})" if dinfo["hbm_tbps"]
               else dinfo["hbm_tbps_source"])
    console.print(f"[bold]Device[/] {dinfo['device_name']} ({device}); HBM bandwidth {bw_note}")

    # ---- model ---------------------------------------------------------------------------------------------------
    reset_gpu_peaks()
    build_s, (model, model_name) = clock.time(lambda: build_model(args, device, dtype))
    ws = weight_stats(model)
    n_params = ws["n_params"]
    from refusal.models.parts import find_parts, model_device, text_config

    if args.device_map:
        device = model_device(model)  # where inputs go (the embedding's device)

    parts = find_parts(model)
    n_layers = parts.n_layers
    vocab = int(text_config(model).vocab_size)
    console.print(f"[bold]Model[/] {model_name}: {_count(n_params)} params, {n_layers} layers, vocab {vocab}, "
                  f"{dtype_name}, built in {build_s:.1f} s")

    res: dict = {
        **dinfo, "arch": None if args.model else args.arch, "model": model_name, "n_params": n_params,
        "n_layers": n_layers, "vocab": vocab, "dtype": dtype_name, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_s": rnd(build_s, 2), "weight_bytes": ws["weight_bytes"],
        "decode_step_weight_bytes": ws["decode_step_weight_bytes"],
        "args": {k: v for k, v in vars(args).items() if not k.startswith("resolved_")},
    }
    if torch.cuda.is_available():
        res["n_gpus"] = torch.cuda.device_count()
        res["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if args.device_map:
        dmap = args.resolved_device_map
        res["device_map"] = device_map_summary(model, dmap) if not args.model else {
            "hf_device_map": {k: str(v) for k, v in dmap.items()}}
        budget = getattr(args, "resolved_max_memory", None)
        res["max_memory_bytes"] = None if budget is None else {str(k): int(v) for k, v in budget.items()}
        res["memory_after_build_bytes"] = gpu_memory(peak=False)
        console.print(f"[bold]Device map[/] {res['device_map']}")

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    stage_t = {"t": t_start}

    def stage_done(name: str) -> None:
        now = time.perf_counter()
        res.setdefault("stage_wall_s", {})[name] = rnd(now - stage_t["t"], 1)
        stage_t["t"] = now
        peaks = gpu_memory()
        if peaks is not None:  # peak bytes allocated on each GPU during this stage (warm-ups included)
            res.setdefault("peak_memory_bytes", {})[name] = peaks
            overall = res.get("peak_memory_bytes_max") or [0] * len(peaks)
            res["peak_memory_bytes_max"] = [max(a, b) for a, b in zip(overall, peaks)]
            res["peak_memory_gib_max"] = [round(b / 2**30, 2) for b in res["peak_memory_bytes_max"]]
            save()
            reset_gpu_peaks()
        console.print(f"[dim]{name}: {now - t_start:.0f} s since start[/]")

    def save():
        res["elapsed_s"] = rnd(time.perf_counter() - t_start, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(out_path)

    # ---- prompts -------------------------------------------------------------------------------------------------
    rng = random.Random(args.seed)
    if args.prefix_len is None:
        args.prefix_len = TEMPLATE_OPENING.get(args.arch, 5) if not args.model else 5
    suffix = [rng.randrange(FIRST_ID, vocab) for _ in range(args.n_positions)]  # the template's post-instruction ids
    opening = [rng.randrange(FIRST_ID, vocab) for _ in range(args.prefix_len)]  # the template's opening
    table: dict[str, list[int]] = {}
    sets = {"train_harmful": ("th", args.n_train), "train_harmless": ("tb", args.n_train),
            "val_harmful": ("vh", args.n_val), "val_harmless": ("vb", args.n_val),
            "gen": ("g", max(gen_batches) if gen_batches else 0)}
    prompts: dict[str, list[str]] = {}
    for key, (name, n) in sets.items():
        kind = "harmful" if key.endswith("harmful") or key == "gen" else "harmless"
        p = make_prompts(rng, name, n, vocab, length_sampler(args, rng, kind), opening, suffix)
        table.update(p)
        prompts[key] = list(p)
    tok = IdTokenizer(table)
    lens = {k: [len(table[p]) for p in v] for k, v in prompts.items()}
    res.update(prompt_lengths=args.lengths, template_opening_tokens=args.prefix_len,
               prompt_len_mean={k: rnd(sum(v) / len(v), 1) for k, v in lens.items() if v},
               prompt_len_max={k: max(v) for k, v in lens.items() if v})
    refusal_ids = sorted(rng.sample(range(FIRST_ID, vocab), 8))

    stage_done("build")

    # ---- 1. extraction -------------------------------------------------------------------------------------------
    console.rule("[bold]1. extraction")
    bs = args.extract_batch
    extract(model, tok, prompts["train_harmful"][:bs], prompts["train_harmless"][:bs], args.n_positions,
            batch_size=bs, batching=batching)  # warm-up
    ext_s, cands = clock.time(lambda: extract(model, tok, prompts["train_harmful"], prompts["train_harmless"],
                                              args.n_positions, batch_size=bs, batching=batching))
    ext_tokens = padded_tokens(lens["train_harmful"], bs) + padded_tokens(lens["train_harmless"], bs)
    res.update(extract_s=rnd(ext_s), extract_prompts=2 * args.n_train, extract_tokens=ext_tokens,
               extract_tok_s=rnd(ext_tokens / ext_s, 1), extract_tflops=rnd(tflops(n_params, ext_tokens, ext_s), 2))
    save()

    stage_done("extract")

    # ---- 2. selection --------------------------------------------------------------------------------------------
    console.rule("[bold]2. selection")
    hv, bv = prompts["val_harmful"], prompts["val_harmless"]
    sel_layers = list(range(0, n_layers, max(1, args.select_stride)))
    score_candidates(model, tok, cands, hv, bv, refusal_ids, layers=[n_layers // 2],
                     batch_size=args.select_batch, batching=batching)  # warm-up
    sel_s, scores = clock.time(lambda: score_candidates(model, tok, cands, hv, bv, refusal_ids, layers=sel_layers,
                                                        batch_size=args.select_batch, batching=batching))
    n_cand = int((~scores.induce.isnan()).sum())
    if n_cand == 0:
        raise SystemExit("no candidate was scored (all differences were zero?)")
    # nominal tokens, the same for ours and naive: one baseline pass over both sets, then per candidate harmful
    # (ablation) + harmless (ablation) + harmless (addition); real prompt tokens (no padding), the template's
    # opening counted in every prompt. The padded count (what one left-padded batch per set computes) beside it.
    h_tok, b_tok = sum(lens["val_harmful"]), sum(lens["val_harmless"])
    sel_tokens = h_tok + b_tok + n_cand * (h_tok + 2 * b_tok)
    hp, bp = len(hv) * max(lens["val_harmful"]), len(bv) * max(lens["val_harmless"])
    res.update(select_tokens_padded=hp + bp + n_cand * (hp + 2 * bp))
    res.update(select_s=rnd(sel_s), select_candidates=n_cand, select_candidates_grid=[args.n_positions, n_layers],
               select_batch=args.select_batch, select_tokens=sel_tokens, select_tok_s=rnd(sel_tokens / sel_s, 1),
               select_tflops=rnd(tflops(n_params, sel_tokens, sel_s), 2),
               select_s_per_candidate=rnd(sel_s / n_cand, 5), select_layer_stride=max(1, args.select_stride))
    console.print(f"{n_cand} candidates in {sel_s:.2f} s")
    save()

    dev = device
    diffs = cands.diffs.to(dev)
    units = diffs / diffs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rids = torch.tensor(refusal_ids, device=dev)
    norms = diffs.norm(dim=-1).cpu()
    cand = [(p, layer) for layer in sel_layers for p in range(args.n_positions)
            if norms[p, layer] > 1e-6 * norms.max()]

    stage_done("select")

    if not args.skip_naive:
        nv = naive_select(model, tok, clock, units, diffs, cand, hv, bv, rids, args.naive_candidates)
        res.update(select_naive_s=rnd(nv["select_naive_s"]), select_naive_s_extrapolated=rnd(nv["select_naive_s"]),
                   select_naive_extrapolated=True, naive_candidates_timed=nv["naive_candidates_timed"],
                   select_naive_timed_s=rnd(nv["select_naive_timed_s"]),
                   select_naive_per_candidate_s=rnd(nv["select_naive_per_candidate_s"], 5),
                   select_naive_baseline_s=rnd(nv["select_naive_baseline_s"]),
                   select_naive_tflops=rnd(tflops(n_params, sel_tokens, nv["select_naive_s"]), 2),
                   select_speedup_vs_naive=rnd(nv["select_naive_s"] / sel_s, 2))
        save()

    stage_done("select_naive")

    # ---- 3. generation under ablation ----------------------------------------------------------------------------
    console.rule("[bold]3. generation")
    pos_i, layer = args.n_positions - 1, max(1, n_layers // 2)
    direction = cands.diffs[pos_i, layer].clone()
    n_new = args.new_tokens
    bound_ms = (ws["decode_step_weight_bytes"] / (dinfo["hbm_tbps"] * 1e12) * 1e3) if dinfo["hbm_tbps"] else None
    res.update(generate_new_tokens=n_new, generate_bound_ms_per_step=rnd(bound_ms, 3),
               generate_direction={"pos": -args.n_positions + pos_i, "layer": layer})
    gen_detail: dict = {}
    caches = ([] if args.no_static else ["static"]) + ["dynamic"]

    # one static decoder for every call, entered around each batch size's warm-up and timed call: the warm-up
    # compiles and captures, the timed call replays (as a run's batches of one shape do)
    decoder = StaticDecoder(model, compile=dev.type == "cuda")

    def gen(ps, new, static):
        return generate(model, tok, ps, max_new_tokens=new, batch_size=len(ps), static_cache=static,
                        decoder=decoder if static else None, batching=batching)

    with ExitStack() as stack:
        try:
            orth_s, _ = clock.time(lambda: stack.enter_context(orthogonalized(model, direction)))
            res["orthogonalize_s"] = rnd(orth_s)
            res["generate_intervention"] = "orthogonalized weights"
        except RefusalError as exc:  # weights offloaded to disk cannot be edited: ablate with hooks instead
            console.print(f"[yellow]{exc.problem} Generating under hook-based ablation instead.[/]")
            stack.enter_context(ablate(model, direction))
            res["generate_intervention"] = "hook ablation (weights offloaded to disk)"
        for b in gen_batches:
            ps = prompts["gen"][:b]
            prompt_tokens = b * max(lens["gen"][:b])
            gen(ps, 1, False)  # warm-up of the prefill
            eager_prefill_s, _ = clock.time(lambda ps=ps: gen(ps, 1, False))
            for cache in caches:
                static = cache == "static"
                if static and b != gen_batches[0] and over_budget():
                    console.print(f"[yellow]skipping static cache at batch {b}: over the {args.budget_s:.0f} s budget")
                    gen_detail[f"{cache}_b{b}"] = {"skipped": "over --budget-s"}
                    continue
                tok.decoded_lengths.clear()
                try:
                    # the warm-up is the same call (static: torch.compile + CUDA graphs; both: allocator growth)
                    with decoder if static else nullcontext():  # the decoder's fused weights stay between calls
                        # each decoder's own prefill (one new token; eager, nothing compiled; first, as its shorter
                        # cache replaces the static decoder's buffers): the eager split prefill is slower than the
                        # static decoder's, and subtracting it from a static call understated the static decoder's
                        # step (4.46 against 5.86 ms on an H200)
                        prefill_s = min(clock.time(lambda ps=ps, static=static: gen(ps, 1, static))[0]
                                        for _ in range(2)) if static else eager_prefill_s
                        warm_s, _ = clock.time(lambda ps=ps, static=static: gen(ps, n_new, static))
                        # the median of --gen-repeats timed calls (one call's time carries the host's jitter)
                        calls = [clock.time(lambda ps=ps, static=static: gen(ps, n_new, static))[0]
                                 for _ in range(args.gen_repeats)]
                        s = statistics.median(calls)
                except Exception as exc:  # e.g. torch.compile failing: keep the other measurements
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    console.print(f"[red]{cache} cache, batch {b} failed: {msg}[/]")
                    gen_detail[f"{cache}_b{b}"] = {"error": msg}
                    res["generate"] = gen_detail
                    save()
                    continue
                full = tok.decoded_lengths[-1] == n_new
                step_ms = (s - prefill_s) / max(1, n_new - 1) * 1e3
                d = {"s": rnd(s), "s_calls": [rnd(c) for c in calls], "tok_s": rnd(b * n_new / s, 1),
                     "ms_per_step": rnd(step_ms, 3),
                     "ms_per_step_best_call": rnd((min(calls) - prefill_s) / max(1, n_new - 1) * 1e3, 3),
                     "ms_per_token_incl_prefill": rnd(s / n_new * 1e3, 3), "prefill_s": rnd(prefill_s),
                     "warmup_s": rnd(warm_s, 2), "full_length": full,
                     "tflops": rnd(tflops(n_params, prompt_tokens + b * n_new, s), 2),
                     "bound_fraction": rnd(bound_ms / step_ms, 3) if bound_ms else None}
                gen_detail[f"{cache}_b{b}"] = d
                if not full:
                    console.print(f"[yellow]generation stopped early ({tok.decoded_lengths[-1]} < {n_new} tokens)[/]")
                console.print(f"{cache} cache, batch {b}: {s:.2f} s, {d['tok_s']} tok/s, {step_ms:.2f} ms/step "
                              f"(warm-up {warm_s:.1f} s)")
                res["generate"] = gen_detail
                save()
    for b in gen_batches:
        avail = {c: gen_detail[f"{c}_b{b}"] for c in caches if "tok_s" in gen_detail.get(f"{c}_b{b}", {})}
        if not avail:
            continue
        best = max(avail, key=lambda c: avail[c]["tok_s"])
        res[f"generate_tok_s_b{b}"] = avail[best]["tok_s"]
        res[f"generate_ms_per_step_b{b}"] = avail[best]["ms_per_step"]
        res[f"generate_cache_b{b}"] = best
        for c, d in avail.items():
            res[f"generate_{c}_tok_s_b{b}"] = d["tok_s"]
            res[f"generate_{c}_ms_per_step_b{b}"] = d["ms_per_step"]
    save()
    stage_done("generate")

    if not args.skip_naive and gen_batches:
        b = gen_batches[0]
        enc = tok(prompts["gen"][:b], return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)

        def hf(new):
            with torch.no_grad(), ablate(model, direction):
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                      pad_token_id=PAD_ID)

        hf_warm_s, _ = clock.time(lambda: hf(n_new))  # warm-up
        hf1_s, _ = clock.time(lambda: hf(1))
        s, seq = clock.time(lambda: hf(n_new))
        full = seq.shape[1] - ids.shape[1] == n_new
        step_ms = (s - hf1_s) / max(1, n_new - 1) * 1e3
        res.update({f"generate_hf_default_tok_s_b{b}": rnd(b * n_new / s, 1),
                    f"generate_hf_default_ms_per_step_b{b}": rnd(step_ms, 3),
                    f"generate_hf_default_s_b{b}": rnd(s), "generate_hf_default_full_length": full,
                    "generate_hf_default_warmup_s": rnd(hf_warm_s, 2)})
        if f"generate_tok_s_b{b}" in res:
            res["generate_speedup_vs_hf_default"] = rnd(res[f"generate_tok_s_b{b}"] * s / (b * n_new), 2)
        save()
    stage_done("generate_naive")

    # ---- optional: select-batch sweep ----------------------------------------------------------------------------
    if sweep:
        if over_budget():
            console.print(f"[yellow]skipping the select-batch sweep: over the {args.budget_s:.0f} s budget[/]")
            res["select_batch_sweep_skipped"] = "over --budget-s"
        else:
            k = min(args.sweep_layers, n_layers - 1)
            sweep_layers = sorted({1 + round(i * (n_layers - 2) / max(1, k - 1)) for i in range(k)})
            n_sw = sum(1 for p, lay in cand if lay in sweep_layers)
            points = {}
            for sb in sweep:
                s, _ = clock.time(lambda sb=sb: score_candidates(model, tok, cands, hv, bv, refusal_ids,
                                                                 layers=sweep_layers, batch_size=sb,
                                                                 batching=batching))
                points[str(sb)] = {"s": rnd(s), "s_per_candidate": rnd(s / max(1, n_sw), 5),
                                   "projected_select_s": rnd(s / max(1, n_sw) * n_cand, 3)}
            res["select_batch_sweep"] = {"layers": sweep_layers, "candidates": n_sw, "points": points}
            save()

    stage_done("sweep")

    # ---- report --------------------------------------------------------------------------------------------------
    res["total_s"] = rnd(time.perf_counter() - t_start, 1)
    save()
    print_table(console, res, gen_detail, gen_batches, Table)
    console.print(f"HBM bandwidth for the bound: {bw_note}")
    console.print(f"[bold]Wrote[/] {out_path}")
    return res


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _f(x, fmt="{:,.2f}"):
    return "-" if x is None else fmt.format(x)


def print_table(console, res: dict, gen_detail: dict, gen_batches: list[int], Table) -> None:
    t = Table(title=f"refusal pipeline on {res['device_name']} — {res['model']} "
                    f"({_count(res['n_params'])} params, {res['dtype']})")
    for col, j in (("stage", "left"), ("seconds", "right"), ("tokens/s", "right"), ("TFLOP/s", "right"),
                   ("ms/step", "right"), ("vs naive", "right"), ("notes", "left")):
        t.add_column(col, justify=j)
    t.add_row("extract", _f(res.get("extract_s"), "{:.3f}"), _f(res.get("extract_tok_s"), "{:,.0f}"),
              _f(res.get("extract_tflops")), "", "", f"{res.get('extract_prompts')} prompts, 5 positions")
    t.add_row("select", _f(res.get("select_s"), "{:.3f}"), _f(res.get("select_tok_s"), "{:,.0f}"),
              _f(res.get("select_tflops")), "", _f(res.get("select_speedup_vs_naive"), "{:.2f}x"),
              f"{res.get('select_candidates')} candidates, batch {res.get('select_batch')}")
    if "select_naive_s" in res:
        t.add_row("select (naive)", _f(res["select_naive_s"], "{:.3f}"),
                  _f(res["select_tokens"] / res["select_naive_s"], "{:,.0f}"), _f(res.get("select_naive_tflops")),
                  "", "1.00x", f"extrapolated from {res['naive_candidates_timed']} candidates")
    for key, d in gen_detail.items():
        cache, b = key.split("_b")
        if "tok_s" not in d:
            t.add_row(f"generate {cache} b{b}", "", "", "", "", "", d.get("error") or d.get("skipped", ""))
            continue
        sp = None
        hf = res.get(f"generate_hf_default_tok_s_b{b}")
        if hf:
            sp = d["tok_s"] / hf
        t.add_row(f"generate {cache} b{b}", _f(d["s"], "{:.3f}"), _f(d["tok_s"], "{:,.0f}"), _f(d["tflops"]),
                  _f(d["ms_per_step"]), _f(sp, "{:.2f}x"),
                  f"{res.get('generate_intervention', 'orthogonalized')}, warm-up {d['warmup_s']} s"
                  + ("" if d["full_length"] else ", STOPPED EARLY"))
    for b in gen_batches:
        if f"generate_hf_default_tok_s_b{b}" in res:
            t.add_row(f"generate HF naive b{b}", _f(res[f"generate_hf_default_s_b{b}"], "{:.3f}"),
                      _f(res[f"generate_hf_default_tok_s_b{b}"], "{:,.0f}"), "",
                      _f(res[f"generate_hf_default_ms_per_step_b{b}"]), "1.00x", "model.generate + ablate hooks")
    if res.get("generate_bound_ms_per_step"):
        t.add_row("decode HBM bound", "", "", "", _f(res["generate_bound_ms_per_step"]), "",
                  f"weights / {res['hbm_tbps']} TB/s")
    console.print(t)
    sw = res.get("select_batch_sweep")
    if sw:
        console.print("select-batch sweep (" + f"{sw['candidates']} candidates on layers {sw['layers']}): " + ", ".join(
            f"{k}: {v['s_per_candidate'] * 1e3:.1f} ms/candidate" for k, v in sw["points"].items()))


if __name__ == "__main__":
    main(sys.argv[1:])
