"""The Triton gate/up + activation kernel of gated MLPs, run on the CPU in Triton's interpreter: against torch (SiLU
and tanh-GELU), swapped only into MLPs that compute the same (Llama and Qwen2 with SiLU, Gemma with GELU, not a ReLU
MLP), inside the static decoder (same tokens), and its refusal to run where it cannot. Its compilation for GPUs is in
test_attention_kernel's AOT test."""

import pytest
import torch

from refusal.errors import RefusalError

pytest.importorskip("triton")


@pytest.fixture
def interpreter():
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("m,n,k,config", [(5, 96, 64, (32, 32, 4, 2)), (70, 40, 48, (32, 32, 4, 2)),
                                          (64, 128, 256, (64, 128, 4, 4))])
def test_gate_up_act_equals_torch(interpreter, m, n, k, config):
    from refusal.generation.mlp_kernel import _launch, gate_up_act

    torch.manual_seed(0)
    x = torch.randn(m, k)
    wg, wu = torch.randn(n, k) / 8, torch.randn(n, k) / 8  # rows, columns and K not whole blocks (some cases)
    want = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)
    torch.testing.assert_close(_launch(x, wg, wu, config=config), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gate_up_act(x, wg, wu), want, atol=1e-5, rtol=1e-4)  # the op, default launch
    gelu = torch.nn.functional.gelu(x @ wg.T, approximate="tanh") * (x @ wu.T)
    torch.testing.assert_close(gate_up_act(x, wg, wu, "gelu_tanh"), gelu, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no activation 'relu'; it has silu, gelu_tanh"):
        gate_up_act(x, wg, wu, "relu")
    strided = torch.randn(k, m).T  # an input whose rows are not contiguous
    torch.testing.assert_close(_launch(strided, wg, wu, config=config),
                               torch.nn.functional.silu(strided @ wg.T) * (strided @ wu.T), atol=1e-5, rtol=1e-4)


# the interpreter's numpy sigmoid overflows to exp(inf) = inf for large negative inputs (then 1 / inf = 0: the right
# value); a GPU's does the same without a warning
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_swapped_only_into_mlps_that_compute_the_same(interpreter):
    from refusal.generation.mlp_kernel import gated_mlp_kernel
    from tests.conftest import build_model

    llama = build_model("llama", 300, n_layers=3)
    mlps = [layer.mlp for layer in llama.model.layers]
    x = torch.randn(2, 3, 64)
    want = [m(x) for m in mlps]
    hooked = mlps[1].up_proj.register_forward_hook(lambda *a: None)  # a hook the kernel would not call
    # a hook on the MLP itself (an intervention at the MLP's output, with per-row tensors that a check on other
    # inputs must not call): the kernel goes in, the hook still edits its output
    seen = []

    def shift(module, args, out):
        seen.append(args[0].shape)
        return out + 1.0
    on_mlp = mlps[2].register_forward_hook(shift)
    with gated_mlp_kernel(mlps) as n:
        assert seen == []  # not called by the check
        assert n == 2 and "forward" in vars(mlps[0]) and "forward" not in vars(mlps[1]) and "forward" in vars(mlps[2])
        for m, w in zip(mlps, want[:2]):
            torch.testing.assert_close(m(x), w, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mlps[2](x), want[2] + 1.0, atol=1e-5, rtol=1e-4)
    on_mlp.remove()
    hooked.remove()
    assert not any("forward" in vars(m) for m in mlps)  # restored
    with gated_mlp_kernel(mlps, max_rows=4):  # 6 rows: the module's own forward
        assert torch.equal(mlps[0](x), want[0])
    seen = []
    down = mlps[2].down_proj.register_forward_hook(lambda m, i, o: seen.append(o))
    with gated_mlp_kernel(mlps):  # down_proj still runs as a module: its hooks see its output
        torch.testing.assert_close(mlps[2](x), want[2], atol=1e-5, rtol=1e-4)
    down.remove()
    assert len(seen) == 4  # the check (the module's own forward, then the kernel's with each activation), the call
    gemma = build_model("gemma", 300, n_layers=1)  # GELU with the tanh approximation
    gemma_mlp = gemma.model.layers[0].mlp
    want = gemma_mlp(x)
    with gated_mlp_kernel([gemma_mlp]) as n:
        assert n == 1
        torch.testing.assert_close(gemma_mlp(x), want, atol=1e-5, rtol=1e-4)
    relu = build_model("llama", 300, n_layers=1).model.layers[0].mlp
    relu.act_fn = torch.nn.ReLU()  # an activation the kernel does not have: the check rejects it
    with gated_mlp_kernel([relu]) as n:
        assert n == 0 and "forward" not in vars(relu)


def test_static_decoder_with_mlp_kernel_gives_the_same_tokens(interpreter):
    from refusal.generation.static import StaticDecoder
    from tests.conftest import build_model

    model = build_model("qwen2", 300, n_layers=2)
    ids = torch.randint(5, 300, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    eos = torch.tensor([], dtype=torch.long)
    want = StaticDecoder(model, compile=False, mlp_kernel=False)(ids, mask, 6, eos, 0)[0]
    for dec in (StaticDecoder(model, compile=False, mlp_kernel=True),
                StaticDecoder(model, compile=True, backend="eager", fuse=True, mlp_kernel=True, attention_kernel=True)):
        assert torch.equal(dec(ids, mask, 6, eos, 0)[0], want)
        assert "Triton gate/up + activation kernel in 2 MLPs" in dec.describe()
    assert not any("forward" in vars(layer.mlp) for layer in model.model.layers)


def test_mlp_kernel_refuses_where_it_cannot_run(monkeypatch):
    from refusal.generation.static import StaticDecoder
    from tests.conftest import build_model

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = build_model("llama", 300, n_layers=1)
    ids = torch.randint(5, 300, (2, 5))
    eos = torch.tensor([], dtype=torch.long)
    with pytest.raises(RefusalError, match="Triton MLP kernel cannot run here: it runs on CUDA"):
        StaticDecoder(model, compile=False, mlp_kernel=True)(ids, torch.ones_like(ids), 3, eos, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    auto = StaticDecoder(model, compile=False)  # unset: on CUDA devices only
    auto(ids, torch.ones_like(ids), 3, eos, 0)
    assert auto.mlp_kernels == 0 and "MLP" not in auto.describe()


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_half_precision_rounds_the_activation_as_the_module_does(interpreter, activation):
    """With both products exact (small integers times powers of two), the kernel's fp16 output is the module's
    ``act(gate) * up`` bit for bit: the activation is rounded to the dtype before the product, as torch's elementwise
    kernels round it (without that rounding about a fifth of these outputs differ in the last bit). fp16, because
    Triton's interpreter has no bf16; the same epilogue serves bf16 on a GPU (benchmarks/fidelity/static_toggles.py)."""
    from refusal.generation.mlp_kernel import gate_up_act

    g = torch.Generator().manual_seed(1)
    x = (torch.randint(-3, 4, (7, 32), generator=g) / 4).half()
    wg = (torch.randint(-3, 4, (48, 32), generator=g) / 8).half()
    wu = (torch.randint(-3, 4, (48, 32), generator=g) / 8).half()
    act = {"silu": torch.nn.functional.silu,
           "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[activation]
    want = act(x @ wg.T) * (x @ wu.T)  # torch's own fp16 ops, as the module runs them
    unrounded = (act((x @ wg.T).float()) * (x @ wu.T).float()).half()
    assert int((unrounded != want).sum()) > 30  # the test can tell the two roundings apart
    got = gate_up_act(x, wg, wu, activation)
    assert got.dtype == torch.float16
    assert torch.equal(got, want), f"{int((got != want).sum())} of {want.numel()} differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_check_tells_gelu_from_silu_at_every_precision(monkeypatch, dtype):
    """Gemma's MLP is tanh-GELU. In bf16, a tolerance relative to the largest output over every input scale let SiLU
    pass (at large inputs the two agree to a few percent of that output), and the kernel then decoded Gemma with
    SiLU: its head strayed by up to 3.1 logits on an H100 (benchmarks/fidelity/static_toggles.py). The check must
    pick GELU at every precision, and SiLU for a SiLU MLP. The kernel is replaced by its math in torch (Triton's
    interpreter has no bf16): the check is what is tested."""
    import refusal.generation.mlp_kernel as mk
    from tests.conftest import build_model

    def torch_kernel(x, wg, wu, activation="silu"):  # the kernel's roundings: products, activation, product
        g, u = (x @ wg.T).float(), (x @ wu.T).float()
        inner = g if activation == "silu" else 1.5957691216057308 * (g + 0.044715 * g ** 3)
        a = g * torch.sigmoid(inner)
        return (a.to(x.dtype).float() * u).to(x.dtype)

    monkeypatch.setattr(mk, "gate_up_act", torch_kernel)
    gemma = build_model("gemma", 300, n_layers=1).to(dtype).model.layers[0].mlp
    llama = build_model("llama", 300, n_layers=1).to(dtype).model.layers[0].mlp
    assert mk._activation(gemma) == "gelu_tanh"
    assert mk._activation(llama) == "silu"
