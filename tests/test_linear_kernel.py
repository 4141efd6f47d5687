"""The Triton linear kernel of decode steps, run on the CPU in Triton's interpreter: against torch, swapped only into
bias-free linear layers of the roles asked for (hooks on them still run), inside the static decoder (same tokens),
and its refusal to run where it cannot."""

import pytest
import torch

from refusal.errors import RefusalError

pytest.importorskip("triton")


@pytest.fixture
def interpreter():
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("m,n,k,config", [(5, 96, 64, (32, 32, 4, 2)), (70, 40, 48, (16, 32, 4, 2)),
                                          (64, 128, 256, (64, 128, 4, 4))])
def test_linear_equals_torch(interpreter, m, n, k, config):
    from refusal.generation.linear_kernel import _launch, linear

    torch.manual_seed(0)
    x = torch.randn(m, k)
    w = torch.randn(n, k) / 8  # rows, columns and K not whole blocks (some cases)
    torch.testing.assert_close(_launch(x, w, config=config), x @ w.T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(linear(x, w, "lm_head"), x @ w.T, atol=1e-5, rtol=1e-4)  # the op
    strided = torch.randn(k, m).T  # an input whose rows are not contiguous
    torch.testing.assert_close(_launch(strided, w, config=config), strided @ w.T, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="contiguous rows"):
        _launch(x, torch.randn(k, n).T)


def test_swapped_into_the_roles_asked_for(interpreter):
    from refusal.generation.linear_kernel import decode_linears
    from tests.conftest import build_model

    model = build_model("qwen2", 300, n_layers=2)
    layers = model.model.layers
    x = torch.randn(2, 3, 64)
    want = layers[0].mlp(x)
    seen = []
    hook = layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape) or out * 2)
    with decode_linears(model, ("down",)) as n:
        assert n == 2 and all("forward" in vars(layer.mlp.down_proj) for layer in layers)
        assert not any("forward" in vars(layer.self_attn.o_proj) for layer in layers)
        torch.testing.assert_close(layers[0].mlp(x), want * 2, atol=1e-5, rtol=1e-4)  # the hook ran on its output
        assert seen == [(2, 3, 64)]
        rows = torch.randn(70, 128)  # more rows than a decode step: the module's own computation
        torch.testing.assert_close(layers[1].mlp.down_proj(rows), rows @ layers[1].mlp.down_proj.weight.T)
    hook.remove()
    with decode_linears(model, ("o", "down", "lm_head")) as n:
        # the q/k/v projections of Qwen2 carry a bias (not swapped, not a role); o, down and lm_head have none
        assert n == 5 and "forward" in vars(model.get_output_embeddings())
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(ValueError, match="no linear role qkv; the roles are o, down, lm_head"):
        with decode_linears(model, ("qkv",)):
            pass


def test_static_decoder_with_linear_kernel_gives_the_same_tokens(interpreter):
    from refusal.generation.static import StaticDecoder
    from tests.conftest import build_model

    model = build_model("llama", 300, n_layers=2)
    ids = torch.randint(5, 300, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    eos = torch.tensor([], dtype=torch.long)
    want = StaticDecoder(model, compile=False, linear_kernel=False)(ids, mask, 6, eos, 0)[0]
    for dec in (StaticDecoder(model, compile=False, linear_kernel=("o", "down", "lm_head")),
                StaticDecoder(model, compile=True, backend="eager", fuse=True, mlp_kernel=True, attention_kernel=True,
                              linear_kernel=True)):
        assert torch.equal(dec(ids, mask, 6, eos, 0)[0], want)
        assert "Triton linear kernel in" in dec.describe()
    assert not any("forward" in vars(m) for m in model.modules())


def test_linear_kernel_refuses_where_it_cannot_run(monkeypatch):
    from refusal.generation.static import StaticDecoder
    from tests.conftest import build_model

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = build_model("llama", 300, n_layers=1)
    ids = torch.randint(5, 300, (2, 5))
    eos = torch.tensor([], dtype=torch.long)
    with pytest.raises(RefusalError, match="Triton linear kernel cannot run here: it runs on CUDA"):
        StaticDecoder(model, compile=False, linear_kernel=("down",))(ids, torch.ones_like(ids), 3, eos, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    auto = StaticDecoder(model, compile=False)  # unset: on CUDA devices only
    auto(ids, torch.ones_like(ids), 3, eos, 0)
    assert auto.linear_kernels == 0 and "linear kernel" not in auto.describe()
