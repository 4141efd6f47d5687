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
    mask[0, :130] = True  # no padding, over several blocks of the kernel's loop
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
    none = decode_attention(q, k, v, torch.zeros_like(mask), 0.3)  # rows with no visible position: zeros
    assert torch.equal(none, torch.zeros_like(none))
    strided = mask.repeat_interleave(2, dim=1)[:, ::2]  # the same mask, not contiguous in its last dim
    torch.testing.assert_close(decode_attention(q, k, v, strided, 0.3), want, atol=1e-5, rtol=1e-4)
    # through gqa_attention itself, as the static decoder asks for it
    via = gqa_attention(None, q, k, v, mask[:, None, None, :], 0.3, refusal_kernel=True)[0]
    torch.testing.assert_close(via, want, atol=1e-5, rtol=1e-4)


def test_static_decoder_with_kernel_gives_the_same_tokens(interpreter):
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
for arch, dtype, precision, d, g in [(90, "bf16", None, 128, 4), (90, "bf16", None, 128, 6), (80, "fp16", None, 80, 2),
                                     (90, "fp32", "ieee", 64, 1)]:
    ptr = {"q": dtype, "k": dtype, "v": dtype, "mask": "i1", "out": dtype}
    const = dict(T=256, TP=256, G=g, GP=16, D=d, DP=max(16, triton.next_power_of_2(d)), BLOCK=64, PRECISION=precision)
    sig = {n: "*" + ptr[n] if n in ptr else "constexpr" if n in const else "fp32" if n == "scale" else "i32"
           for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 2, "num_stages": 2})
    assert compiled.asm["cubin"], (arch, dtype)
    print("compiled", arch, dtype, d, g)

fn = K.gate_up_act_kernel  # the MLP kernel (refusal.generation.mlp_kernel) at its default launch
names = list(inspect.signature(fn.fn).parameters)
for arch, dtype, precision, act in [(90, "bf16", None, 0), (80, "fp16", None, 1), (90, "fp32", "ieee", 0)]:
    const = dict(N=14336, K=4096, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, PRECISION=precision, ACT=act)
    sig = {n: "*" + dtype if n in ("x", "wg", "wu", "out") else "constexpr" if n in const else "i32" for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})
    assert compiled.asm["cubin"], (arch, dtype)
    print("compiled mlp", arch, dtype)
"""


def test_kernel_compiles_for_gpus(tmp_path):
    """Triton compiles the kernels to GPU binaries (sm_80 / sm_90, bf16 / fp16 / fp32) without a GPU: a kernel the
    interpreter runs but the compiler rejects fails here, not on a user's GPU."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 7
