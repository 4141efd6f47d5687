"""The Triton decoding attention, run on the CPU in Triton's interpreter: against gqa_attention, inside the static
decoder (same tokens), under torch.compile, and its refusal to run where it cannot."""

import pytest
import torch

from refusal.errors import RefusalError
from refusal.generation.attention import gqa_attention

pytest.importorskip("triton")


@pytest.fixture
def interpreter():
    """Triton's interpreter (numpy on the CPU), which conftest chose before triton was imported."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"


def _mask(b: int, total: int) -> torch.Tensor:
    mask = torch.zeros(b, total, dtype=torch.bool)
    mask[0, :130] = True  # no padding, over three blocks of the kernel's loop (64 positions each)
    mask[1, 7:100] = True  # left padding
    mask[2, 66:70] = True  # the whole first block padding, the span ends off a block boundary
    return mask


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (4, 4, 32), (6, 3, 80), (12, 2, 128)])
def test_decode_attention_equals_gqa_attention(interpreter, heads, kv_heads, dim):
    from refusal.generation.attention_kernel import decode_attention

    torch.manual_seed(0)
    b, total = 3, 140
    # the query as a model hands it over: a transposed view of (b, q, h, d)
    q = torch.randn(b, 1, heads, dim).transpose(1, 2)
    k, v = torch.randn(b, kv_heads, total, dim), torch.randn(b, kv_heads, total, dim)
    mask = _mask(b, total)
    for row, end in ((0, 130), (1, 100), (2, 70)):  # slots past a row's span: never read (else NaNs would spread)
        k[row, :, end:] = v[row, :, end:] = float("nan")
    want = gqa_attention(None, q, torch.nan_to_num(k), torch.nan_to_num(v), mask[:, None, None, :], 0.3)[0]
    got = decode_attention(q, k, v, mask, 0.3)
    assert got.shape == want.shape == (b, 1, heads, dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    strided = mask.repeat_interleave(2, dim=1)[:, ::2]  # the same mask, not contiguous in its last dim
    torch.testing.assert_close(decode_attention(q, k, v, strided, 0.3), want, atol=1e-5, rtol=1e-4)
    # through gqa_attention itself, as the static decoder asks for it
    via = gqa_attention(None, q, k, v, mask[:, None, None, :], 0.3, refusal_kernel=True)[0]
    torch.testing.assert_close(via, want, atol=1e-5, rtol=1e-4)


def test_prefetch_programs_read_the_weight_and_leave_the_attention_alone(interpreter):
    from refusal.generation.attention_kernel import _launch

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 32), torch.randn(3, 2, 140, 32), torch.randn(3, 2, 140, 32)
    mask = _mask(3, 140)
    w = torch.randn(96, 70)  # not a whole number of the programs' blocks
    sink = torch.zeros(2 * 3)
    want = _launch(q, k, v, mask, 0.3)
    got = _launch(q, k, v, mask, 0.3, prefetch=w, prefetch_rows=3, sink=sink)
    assert torch.equal(got, want)
    torch.testing.assert_close(sink.sum(), w.sum(), rtol=1e-4, atol=1e-3)  # every element read once


def test_static_decoder_with_kernel_gives_the_same_tokens(interpreter, monkeypatch):
    from refusal.generation import attention_kernel
    from refusal.generation.static import StaticDecoder
    from tests.conftest import build_model

    model = build_model("llama", 300, n_layers=2)
    ids = torch.randint(5, 300, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    eos = torch.tensor([], dtype=torch.long)
    plain = StaticDecoder(model, compile=False, attention_kernel=False)
    want = plain(ids, mask, 6, eos, 0)[0]
    assert "Triton" not in plain.describe()
    dec = StaticDecoder(model, compile=False, attention_kernel=True)
    assert torch.equal(dec(ids, mask, 6, eos, 0)[0], want)
    assert dec.describe().endswith("Triton decoding attention")
    # compiled by dynamo (eager backend: the op stays opaque, with its fake version for shapes)
    compiled = StaticDecoder(model, compile=True, backend="eager", attention_kernel=True)
    assert torch.equal(compiled(ids, mask, 6, eos, 0)[0], want)
    # with the output projections' weights read into L2 by the same launches (eager and compiled)
    launch, seen = attention_kernel._launch, []

    def recording(*a, **kw):
        seen.append(kw.get("prefetch"))
        return launch(*a, **kw)
    monkeypatch.setattr(attention_kernel, "_launch", recording)
    names = {n for n, _ in model.named_modules()}
    for dec in (StaticDecoder(model, compile=False, attention_kernel=True, prefetch=True),
                StaticDecoder(model, compile=True, backend="eager", attention_kernel=True, prefetch=True)):
        with dec:
            assert {n for n, _ in model.named_modules()} == names  # a plain attribute, not a submodule
            assert torch.equal(dec(ids, mask, 6, eos, 0)[0], want)
        assert dec.describe().endswith("with L2 prefetch")
    o_proj = {id(layer.self_attn.o_proj.weight) for layer in model.model.layers}
    assert seen and all(id(w) in o_proj for w in seen)  # every launch was given its layer's output weight
    assert not any("_refusal_out_proj" in m.__dict__ for m in model.modules())  # removed on exit


def test_kernel_refuses_where_it_cannot_run(monkeypatch):
    from refusal.generation.attention_kernel import why_not
    from refusal.generation.static import StaticDecoder
    from tests.conftest import build_model

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in why_not(torch.device("cpu"))
    model = build_model("llama", 300, n_layers=1)
    ids = torch.randint(5, 300, (2, 5))
    with pytest.raises(RefusalError, match="Triton decoding attention cannot run here: it runs on CUDA"):
        StaticDecoder(model, compile=False, attention_kernel=True)(ids, torch.ones_like(ids), 3,
                                                                   torch.tensor([], dtype=torch.long), 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    auto = StaticDecoder(model, compile=False)  # unset: the kernel on CUDA devices only (not the interpreter)
    auto(ids, torch.ones_like(ids), 3, torch.tensor([], dtype=torch.long), 0)
    assert not auto.kernel
    with pytest.raises(TypeError, match="boolean mask"):
        from refusal.generation.attention_kernel import decode_attention

        decode_attention(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16),
                         torch.ones(1, 4), 1.0)


AOT = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from refusal.generation import _triton_decode as K

fn = K.decode_attention_kernel
names = list(inspect.signature(fn.fn).parameters)
for arch, dtype, precision, d, g, rows in [(90, "bf16", None, 128, 4, 0), (90, "bf16", None, 128, 6, 16),
                                          (80, "fp16", None, 80, 2, 0), (90, "fp32", "ieee", 64, 1, 0)]:
    ptr = {"q": dtype, "k": dtype, "v": dtype, "mask": "i1", "out": dtype, "w": dtype, "sink": "fp32"}
    const = dict(T=256, TP=256, G=g, GP=16, D=d, DP=max(16, triton.next_power_of_2(d)), BLOCK=64,
                 PRECISION=precision, PRE_ROWS=rows, PRE_PER=32768 if rows else 0, PRE_BLOCK=64 if rows else 16,
                 PRE_ASM=bool(rows), LINE=64, PDL=False)
    sig = {n: "*" + ptr[n] if n in ptr else "constexpr" if n in const else "fp32" if n == "scale" else "i32"
           for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 2, "num_stages": 2})
    assert compiled.asm["cubin"], (arch, dtype)
    # the prefetch programs issue PTX prefetches into L2 (not optimised away)
    assert ("prefetch.global.L2::evict_last" in compiled.asm["ptx"]) == bool(rows), (arch, dtype, rows)
    print("compiled", arch, dtype, d, g, rows)

fn = K.gate_up_act_kernel  # the MLP kernel (refusal.generation.mlp_kernel) at its default launch
names = list(inspect.signature(fn.fn).parameters)
for arch, dtype, precision in [(90, "bf16", None), (80, "fp16", None), (90, "fp32", "ieee")]:
    const = dict(N=14336, K=4096, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, PRECISION=precision, PDL=False, PRE_K=0,
                 LINE=64)
    sig = {n: "*" + dtype if n in ("x", "wg", "wu", "out") else "constexpr" if n in const else "i32" for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 4})
    assert compiled.asm["cubin"], (arch, dtype)
    print("compiled mlp", arch, dtype)

# launched with programmatic dependent launch (Hopper): both kernels wait for the kernel before; the MLP kernel first
# prefetches its first weight blocks into L2
for fn, const, ptr, warps in [
        (K.gate_up_act_kernel, dict(N=14336, K=4096, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, PRECISION=None, PDL=True,
                                    PRE_K=256, LINE=64), dict(x="bf16", wg="bf16", wu="bf16", out="bf16"), 4),
        (K.decode_attention_kernel, dict(T=256, TP=256, G=4, GP=16, D=128, DP=128, BLOCK=64, PRECISION=None,
                                         PRE_ROWS=0, PRE_PER=0, PRE_BLOCK=16, PRE_ASM=False, LINE=1, PDL=True),
         dict(q="bf16", k="bf16", v="bf16", mask="i1", out="bf16", w="bf16", sink="fp32"), 2)]:
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "*" + ptr[n] if n in ptr else "constexpr" if n in const else "fp32" if n == "scale" else "i32"
           for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": 2, "launch_pdl": True})
    ptx = compiled.asm["ptx"]
    assert "griddepcontrol.wait" in ptx and compiled.metadata.launch_pdl, fn
    assert ("prefetch.global.L2::evict_last" in ptx) == ("PRE_K" in const), fn
    print("compiled pdl", fn)
"""


def test_kernel_compiles_for_gpus(tmp_path):
    """Triton compiles the kernels to GPU binaries (sm_80 / sm_90, bf16 / fp16 / fp32, with the prefetch programs)
    without a GPU: a kernel the interpreter runs but the compiler rejects fails here, not on a user's GPU."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 9
