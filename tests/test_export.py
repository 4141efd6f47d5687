"""Exporting edited models: weight-orthogonalization options, Hugging Face folders, GGUF files (edited in place or
written from a Hugging Face model), llama.cpp control vectors, and the `refusal abliterate` / `refusal control-vector`
commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model

from refusal.directions.base import Direction
from refusal.errors import RefusalError
from refusal.export.control_vector import control_vector_tensors, llama_cpp_index, write_control_vector
from refusal.export.gguf import edit_gguf, export_gguf, write_gguf
from refusal.export.hf import export_hf
from refusal.interventions.hooks import ablate, add
from refusal.interventions.weights import orthogonalize_, orthogonalized
from refusal.models.writers import residual_writers

HIDDEN = 64


def _ids(tokenizer, n: int = 12):
    return torch.randint(4, len(tokenizer), (2, n), generator=torch.Generator().manual_seed(0))


def _dir(seed: int = 1, *shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (HIDDEN,)), generator=torch.Generator().manual_seed(seed))


def _ablated_logits(model, d, ids):
    with ablate(model, d):
        return model(ids).logits


def _matrices(model):
    """(writer, (n_in, hidden) float32) for every non-fused writer: rows indexed by the input."""
    return [(w, w.weight.detach().float().movedim(w.axis, -1)) for w in residual_writers(model)]


# ---- interventions/weights.py options ------------------------------------------------------------------------


def test_subspace_orthogonalization_equals_hook_ablation(model, tokenizer):
    ids = _ids(tokenizer)
    sub = _dir(3, 3, HIDDEN)
    want = _ablated_logits(model, sub, ids)
    with orthogonalized(model, sub):
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_layer_weights_of_one_equal_plain_and_zero_does_nothing(tokenizer):
    ids = _ids(tokenizer)
    d = _dir()
    m = build_model("llama", len(tokenizer))
    with orthogonalized(m, d):
        plain = m(ids).logits
    with orthogonalized(m, d, layer_weights=[1.0] * 4):
        ones = m(ids).logits
    base = m(ids).logits
    with orthogonalized(m, d, layer_weights=[0.0] * 4):
        zeros = m(ids).logits
    torch.testing.assert_close(ones, plain)
    torch.testing.assert_close(zeros, base)


def test_layer_weights_scale_the_edit_per_layer(tokenizer):
    m = build_model("qwen2", len(tokenizer))
    d = _dir()
    u = d / d.norm()
    before = {w.name: w.weight.detach().clone() for w in residual_writers(m)}
    weights = [0.0, 0.5, 1.0, 2.0]
    orthogonalize_(m, d, layer_weights=weights)
    for w in residual_writers(m):
        s = weights[0 if w.layer is None else w.layer]
        x0 = before[w.name].movedim(w.axis, -1)
        want = x0 - s * (x0 @ u)[..., None] * u
        torch.testing.assert_close(w.weight.detach().movedim(w.axis, -1), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RefusalError, match="layer_weights has 3 entries"):
        orthogonalize_(m, d, layer_weights=[1.0, 1.0, 1.0])


def test_orthogonal_to_harmless_projects_the_direction_first(tokenizer):
    h = _dir(5)
    d = _dir(6) + 3 * h
    d_perp = d - (d @ h) / (h @ h) * h
    a = build_model("llama", len(tokenizer))
    b = build_model("llama", len(tokenizer))
    orthogonalize_(a, d, orthogonal_to_harmless=h)
    orthogonalize_(b, d_perp)
    for (_, x), (_, y) in zip(_matrices(a), _matrices(b)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # the harmless mean's direction is still written by the edited weights
    hu = h / h.norm()
    assert max((x @ hu).abs().max().item() for _, x in _matrices(a)) > 1e-2


def test_norm_preserving_keeps_row_norms(model, tokenizer):
    d = _dir()
    u = d / d.norm()
    norms = [x.norm(dim=0) for _, x in _matrices(model)]  # per residual coordinate, over the input axis
    ids = _ids(tokenizer)
    with orthogonalized(model, d):
        plain = model(ids).logits
    orthogonalize_(model, d, norm_preserving=True)
    for (w, x), n in zip(_matrices(model), norms):
        torch.testing.assert_close(x.norm(dim=0), n, atol=1e-5, rtol=1e-5)
        # most of the direction is gone, but not all: the rescaling brings some back
        assert (x @ u).norm() < 0.5 * (n * u).norm() or w.kind == "embedding"
    assert (model(ids).logits - plain).abs().max() > 1e-4


def test_per_layer_directions_and_shape_errors(tokenizer):
    m = build_model("llama", len(tokenizer))
    per_layer = _dir(7, 4, 1, HIDDEN)
    orthogonalize_(m, per_layer)
    for w, x in _matrices(m):
        u = per_layer[0 if w.layer is None else w.layer, 0]
        assert (x @ (u / u.norm())).abs().max() < 1e-5
    with pytest.raises(RefusalError, match="hidden size is 64"):
        orthogonalize_(m, torch.randn(32))
    with pytest.raises(RefusalError, match="each of 3 layers but the model has 4"):
        orthogonalize_(m, torch.randn(3, 1, HIDDEN))


def test_orthogonalized_restores_weights_and_tying(tokenizer):
    m = build_model("qwen2", len(tokenizer))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with orthogonalized(m, _dir(), norm_preserving=True):
        assert m.lm_head.weight is not m.model.embed_tokens.weight
        assert not m.config.tie_word_embeddings
    assert m.lm_head.weight is m.model.embed_tokens.weight and m.config.tie_word_embeddings
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- export/hf.py ------------------------------------------------------------------------------------------


def test_export_hf_loads_back_equal_to_hook_ablation(model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = _ids(tokenizer)
    d = Direction(_dir(), layer=2, pos=-1, scores={"kl": 0.05})
    base = model(ids).logits
    want = _ablated_logits(model, d.vector, ids)
    out = export_hf(model, tokenizer, d, tmp_path / "out",
                    card={"base_model": "org/tiny", "scores": {"harmful": {"ablation": 0.91}, "kl": 0.05}})
    torch.testing.assert_close(model(ids).logits, base)  # the caller's model is unchanged
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(loaded(ids).logits, want, atol=2e-4, rtol=1e-4)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == tokenizer.chat_template
    readme = (out / "README.md").read_text()
    assert "base_model: org/tiny" in readme and "| harmful / ablation | 0.91 |" in readme
    assert "direction layer**: 2" in readme and "4 attention output" in readme
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_export_hf_refuses_before_writing(tokenizer, tmp_path):
    m = build_model("llama", len(tokenizer))
    with pytest.raises(RefusalError, match="hidden size"):
        export_hf(m, tokenizer, torch.randn(32), tmp_path / "a")
    with pytest.raises(RefusalError, match="layers"):
        export_hf(m, tokenizer, torch.randn(5, 1, HIDDEN), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep").write_text("x")
    with pytest.raises(RefusalError, match="already exists"):
        export_hf(m, tokenizer, _dir(), tmp_path / "c")
    assert (tmp_path / "c" / "keep").is_file()
    export_hf(m, tokenizer, _dir(), tmp_path / "c", overwrite=True)
    assert not (tmp_path / "c" / "keep").exists() and (tmp_path / "c" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_export_hf_in_place_keeps_the_edit(tokenizer, tmp_path):
    m = build_model("gemma", len(tokenizer))
    ids = _ids(tokenizer)
    want = _ablated_logits(m, _dir(), ids)
    export_hf(m, tokenizer, _dir(), tmp_path / "o", in_place=True)
    torch.testing.assert_close(m(ids).logits, want, atol=2e-4, rtol=1e-4)


def test_export_hf_moe(tokenizer, tmp_path):
    from test_moe import _qwen2_moe
    from transformers import AutoModelForCausalLM

    m = _qwen2_moe(2)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    want = _ablated_logits(m, _dir(), ids)
    out = export_hf(m, tokenizer, _dir(), tmp_path / "moe")
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, want, atol=2e-4, rtol=1e-4)
    assert "8 expert output, 2 shared-expert output matrices" in (out / "README.md").read_text()


# ---- export/gguf.py ----------------------------------------------------------------------------------------


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_write_gguf_round_trips_model_and_tokenizer(arch, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    m = build_model(arch, len(tokenizer))
    ids = _ids(tokenizer)
    path = write_gguf(m, tokenizer, tmp_path / f"{arch}.gguf").path
    torch.testing.assert_close(_load_gguf(path)(ids).logits, m(ids).logits)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert tok(text).input_ids == tokenizer(text).input_ids
    assert tok.chat_template == tokenizer.chat_template
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_gguf_from_hf_equals_hook_ablation(arch, tokenizer, tmp_path):
    m = build_model(arch, len(tokenizer))
    ids = _ids(tokenizer)
    d = _dir()
    want = _ablated_logits(m, d, ids)
    base = m(ids).logits
    res = export_gguf(m, tokenizer, d, tmp_path / "abl.gguf")
    torch.testing.assert_close(m(ids).logits, base)
    torch.testing.assert_close(_load_gguf(res.path)(ids).logits, want, atol=2e-4, rtol=1e-4)


def test_export_gguf_refuses_unsupported_architecture(tokenizer, tmp_path):
    m = build_model("gemma", len(tokenizer))
    with pytest.raises(RefusalError, match="architecture 'gemma'"):
        export_gguf(m, tokenizer, _dir(), tmp_path / "g.gguf")
    assert list(tmp_path.iterdir()) == []


def _raw(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(path, "r")
    return {t.name: (t.tensor_type, t.data.tobytes(), tuple(int(x) for x in t.shape)) for t in r.tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_edit_gguf_float_source_is_exact(arch, tokenizer, tmp_path):
    m = build_model(arch, len(tokenizer))
    src = write_gguf(m, tokenizer, tmp_path / "src.gguf").path
    ids = _ids(tokenizer)
    d = _dir()
    want = _ablated_logits(m, d, ids)
    res = edit_gguf(src, d, tmp_path / "out.gguf")
    assert sorted(res.edited) == sorted(["token_embd.weight"] + [f"blk.{i}.{k}.weight" for i in range(4)
                                                                  for k in ("attn_output", "ffn_down")])
    assert res.added == (["output.weight"] if arch == "qwen2" else [])  # a tied head gets the original embedding
    torch.testing.assert_close(_load_gguf(res.path)(ids).logits, want, atol=2e-4, rtol=1e-4)
    a, b = _raw(src), _raw(res.path)
    if arch == "qwen2":
        assert b["output.weight"] == a["token_embd.weight"]


def test_edit_gguf_quantized_keeps_untouched_tensors_and_metadata(tokenizer, tmp_path):
    import gguf
    from gguf.quants import dequantize

    m = build_model("llama", len(tokenizer))
    src = write_gguf(m, tokenizer, tmp_path / "q8.gguf", dtype="q8_0").path
    ids = _ids(tokenizer)
    d = _dir()
    orig = _load_gguf(src)
    base = orig(ids).logits
    want = _ablated_logits(orig, d, ids)
    res = edit_gguf(src, d, tmp_path / "out.gguf")
    assert set(res.edited.values()) == {"Q8_0"}  # requantized in the source's own type
    a, b = _raw(src), _raw(res.path)
    assert set(a) == set(b)
    for name in a:
        if name in res.edited:
            assert b[name][0] == a[name][0] and b[name][2] == a[name][2]
        else:
            assert b[name] == a[name], name  # byte-identical, still quantized
    assert abs(os.path.getsize(res.path) - os.path.getsize(src)) < 4096
    ra, rb = gguf.GGUFReader(src, "r"), gguf.GGUFReader(res.path, "r")
    assert set(ra.fields) == set(rb.fields)
    for k in ra.fields:
        if not k.startswith("GGUF."):
            assert ra.fields[k].contents() == rb.fields[k].contents(), k
    # the edited tensor is the edit of the dequantized source, to Q8_0 rounding (half a step of 1/127 of the block
    # max, plus the rounding of the step itself to float16)
    t_a = {t.name: t for t in ra.tensors}["blk.1.ffn_down.weight"]
    t_b = {t.name: t for t in rb.tensors}["blk.1.ffn_down.weight"]
    x = torch.from_numpy(dequantize(t_a.data, t_a.tensor_type).copy())
    u = d / d.norm()
    exact = x - u[:, None] * (u @ x)[None, :]
    got = torch.from_numpy(dequantize(t_b.data, t_b.tensor_type).copy())
    step = exact.abs().reshape(exact.shape[0], -1, 32).amax(-1, keepdim=True) / 127
    assert ((got - exact).reshape(exact.shape[0], -1, 32).abs() <= 0.6 * step + 1e-6).all()
    # logits: to quantization tolerance of hook ablation on the original (quantized) model
    got_logits = _load_gguf(res.path)(ids).logits
    assert (got_logits - want).abs().max() < 0.1 * (base - want).abs().max()
    assert torch.nn.functional.cosine_similarity(got_logits.flatten(), want.flatten(), dim=0) > 0.999


def test_edit_gguf_can_write_f16_and_refuses_bad_input(tokenizer, tmp_path):
    m = build_model("llama", len(tokenizer))
    src = write_gguf(m, tokenizer, tmp_path / "src.gguf", dtype="q8_0").path
    res = edit_gguf(src, _dir(), tmp_path / "f16.gguf", edited_type="f16")
    assert set(res.edited.values()) == {"F16"}
    with pytest.raises(RefusalError, match="already exists"):
        edit_gguf(src, _dir(), tmp_path / "f16.gguf")
    with pytest.raises(RefusalError, match="hidden size is 64"):
        edit_gguf(src, torch.randn(48), tmp_path / "x.gguf")
    with pytest.raises(RefusalError, match="each of 2 layers but the model has 4"):
        edit_gguf(src, torch.randn(2, 1, HIDDEN), tmp_path / "x.gguf")
    with pytest.raises(RefusalError, match="replace its own input"):
        edit_gguf(src, _dir(), src, overwrite=True)
    assert not (tmp_path / "x.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_edit_gguf_moe_tensors_match_hf_orthogonalization(tmp_path):
    """A Qwen2-MoE written as GGUF by hand (llama.cpp names and layout): the edited ffn_down_exps / ffn_down_shexp /
    attn_output / token_embd equal the HF weights after orthogonalize_, so the GGUF orientation is right."""
    import gguf
    from gguf.quants import dequantize
    from test_moe import N_EXPERTS, _qwen2_moe

    m = _qwen2_moe(2)
    hf = {n: p.detach().clone() for n, p in m.named_parameters()}
    n_layers = m.config.num_hidden_layers
    names = {"model.embed_tokens.weight": "token_embd.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names.update({p + "self_attn.o_proj.weight": f"blk.{i}.attn_output.weight",
                      p + "mlp.experts.down_proj": f"blk.{i}.ffn_down_exps.weight",
                      p + "mlp.shared_expert.down_proj.weight": f"blk.{i}.ffn_down_shexp.weight",
                      p + "mlp.experts.gate_up_proj": f"blk.{i}.ffn_gate_up_exps.weight",
                      p + "self_attn.q_proj.weight": f"blk.{i}.attn_q.weight"})
    w = gguf.GGUFWriter(tmp_path / "moe.gguf", "qwen2moe")
    w.add_embedding_length(HIDDEN)
    w.add_block_count(n_layers)
    w.add_expert_count(N_EXPERTS)
    for hf_name, g_name in names.items():
        w.add_tensor(g_name, hf[hf_name].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    d = _dir(9)
    res = edit_gguf(tmp_path / "moe.gguf", d, tmp_path / "moe-abl.gguf")
    orthogonalize_(m, d)
    edited = {n: p.detach() for n, p in m.named_parameters()}
    got = {t.name: t for t in gguf.GGUFReader(res.path, "r").tensors}
    assert "blk.1.ffn_down_exps.weight" in res.edited and "blk.1.ffn_down_shexp.weight" in res.edited
    for hf_name, g_name in names.items():
        t = got[g_name]
        x = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        torch.testing.assert_close(x, edited[hf_name], atol=1e-5, rtol=1e-5, msg=g_name)
    assert res.added == ["output.weight"]  # the hand-written file has no output head: tied


# ---- export/control_vector.py ------------------------------------------------------------------------------


def test_control_vector_file(tmp_path):
    import gguf

    v = _dir(4)
    d = Direction(v, layer=3, pos=-1)
    path = write_control_vector(d, tmp_path / "cv.gguf", n_layers=6, model_hint="qwen2", coeff=-2.0,
                                hidden_size=HIDDEN)
    r = gguf.GGUFReader(path, "r")
    assert r.get_field("general.architecture").contents() == "controlvector"
    assert r.get_field("controlvector.model_hint").contents() == "qwen2"
    assert r.get_field("controlvector.layer_count").contents() == 5
    tensors = {t.name: t for t in r.tensors}
    assert sorted(tensors) == [f"direction.{n}" for n in range(1, 6)]
    for n, t in tensors.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and tuple(t.shape) == (HIDDEN,)
        want = -2.0 * v.numpy() if n == "direction.2" else np.zeros(HIDDEN, np.float32)  # input of 3 = after block 2
        np.testing.assert_allclose(np.asarray(t.data), want, rtol=1e-6, atol=1e-7)


def test_control_vector_matches_refusal_add_semantics(tokenizer):
    """direction.N is added after block N (llama.cpp's build_cvec(cur, il=N)), which is refusal's add at the input
    of layer N + 1: adding the file's vectors after each block gives the same logits as `add`."""
    m = build_model("llama", len(tokenizer))
    ids = _ids(tokenizer)
    v = _dir(4)
    tensors = control_vector_tensors(v, 4, layer=2, coeff=1.5)
    with add(m, v, 2, coeff=1.5):
        want = m(ids).logits
    handles = []
    for n, arr in tensors.items():
        vec = torch.from_numpy(arr)
        block = m.model.layers[int(n.split(".")[1])]
        handles.append(block.register_forward_hook(lambda _m, _a, out, vec=vec: (
            (out[0] + vec,) + tuple(out[1:]) if isinstance(out, tuple) else out + vec)))
    try:
        got = m(ids).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want)


def test_control_vector_refusals(tmp_path):
    v = _dir()
    with pytest.raises(RefusalError, match="refusal abliterate"):
        control_vector_tensors(v, 6, layer=3, intervention="ablate")
    for layer in (0, 1):
        with pytest.raises(RefusalError, match=f"input of layer {layer}"):
            llama_cpp_index(layer, 6)
    assert llama_cpp_index(2, 6) == 1 and llama_cpp_index(5, 6) == 4
    with pytest.raises(RefusalError, match="outside"):
        llama_cpp_index(6, 6)
    with pytest.raises(RefusalError, match="needs one"):
        control_vector_tensors(torch.randn(2, HIDDEN), 6, layer=3)
    with pytest.raises(RefusalError, match="hidden size is 32"):
        write_control_vector(v, tmp_path / "x.gguf", n_layers=6, model_hint="llama", layer=3, hidden_size=32)
    assert not (tmp_path / "x.gguf").exists()


# ---- cli/export.py -----------------------------------------------------------------------------------------


def _run_dir(tmp_path: Path, spec: str, layer: int = 2) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"model: {spec}\ndtype: float32\n")
    Direction(_dir(), layer=layer, pos=-1, scores={"kl": 0.02}).save(run / "direction.safetensors")
    (run / "summary.json").write_text(json.dumps({"results": {"harmful": {"ablation": {
        "refusal": {"rate": 0.05, "low": 0.01, "high": 0.12, "n": 100}}}}}))
    return run


def _cli(*args: str):
    from typer.testing import CliRunner

    from refusal.cli.app import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    res.text = " ".join(res.output.split())  # rich wraps long lines
    return res


def test_cli_abliterate_hf_folder(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _run_dir(tmp_path, str(model_dir))
    res = _cli("abliterate", run, "--out", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 0, res.output
    orig = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(4, 400, (2, 10), generator=torch.Generator().manual_seed(0))
    want = _ablated_logits(orig, Direction.load(run / "direction.safetensors").vector, ids)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits, want,
                               atol=2e-4, rtol=1e-4)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "harmful / ablation / refusal rate (n=100) | 0.05 [0.01, 0.12]" in readme
    res = _cli("abliterate", run, "--out", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 2 and "already exists" in res.text
    res = _cli("abliterate", run, "--out", tmp_path / "out", "--device", "cpu", "--overwrite", "--norm-preserving")
    assert res.exit_code == 0, res.output
    assert "norm preserving**: yes" in (tmp_path / "out" / "README.md").read_text()


def test_cli_abliterate_gguf(model_dir, tmp_path, tokenizer):
    # a plain HF model -> written as GGUF
    run = _run_dir(tmp_path, str(model_dir))
    res = _cli("abliterate", run, "--out", tmp_path / "a.gguf", "--gguf", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a.gguf").is_file()
    # a GGUF model -> the file itself is edited (no model load), untouched tensors byte-identical
    src = write_gguf(build_model("qwen2", len(tokenizer), n_layers=3), tokenizer, tmp_path / "m.gguf",
                     dtype="q8_0").path
    run2 = tmp_path / "run2"
    run2.mkdir()
    (run2 / "config.yaml").write_text(f"model: {src}\n")
    Direction(_dir(), layer=1, pos=-1).save(run2 / "direction.safetensors")
    res = _cli("abliterate", run2, "--out", tmp_path / "b.gguf", "--gguf")
    assert res.exit_code == 0, res.output
    assert "tensors stay quantized" in res.text and "added output.weight" in res.text
    a, b = _raw(src), _raw(tmp_path / "b.gguf")
    assert a["blk.0.attn_q.weight"] == b["blk.0.attn_q.weight"]
    assert a["blk.0.attn_output.weight"] != b["blk.0.attn_output.weight"]
    # a GGUF model -> a Hugging Face folder (the dequantized model, edited)
    res = _cli("abliterate", run2, "--out", tmp_path / "hf", "--device", "cpu")
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM

    ids = _ids(tokenizer)
    orig = _load_gguf(src)
    want = _ablated_logits(orig, Direction.load(run2 / "direction.safetensors").vector, ids)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits, want,
                               atol=2e-4, rtol=1e-4)


def test_cli_control_vector(model_dir, tmp_path):
    import gguf

    run = _run_dir(tmp_path, str(model_dir), layer=2)
    res = _cli("control-vector", run, "--out", tmp_path / "cv.gguf", "--coeff", "0.5")
    assert res.exit_code == 0, res.output
    assert "direction.1" in res.text
    r = gguf.GGUFReader(tmp_path / "cv.gguf", "r")
    assert r.get_field("controlvector.model_hint").contents() == "qwen2"
    assert r.get_field("controlvector.layer_count").contents() == 2  # the tiny model has 3 layers
    t = {t.name: t for t in r.tensors}
    np.testing.assert_allclose(np.asarray(t["direction.1"].data), 0.5 * _dir().numpy(), rtol=1e-6)
    res = _cli("control-vector", run, "--out", tmp_path / "cv1.gguf", "--layer", "1")
    assert res.exit_code == 2 and "input of layer 1" in res.text


def test_cli_errors(tmp_path, model_dir):
    res = _cli("abliterate", tmp_path / "nope", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "No run folder" in res.text
    run = tmp_path / "run"
    run.mkdir()
    res = _cli("control-vector", run, "--out", tmp_path / "o.gguf")
    assert res.exit_code == 2 and "no config.yaml" in res.text
    (run / "config.yaml").write_text(f"model: {model_dir}\n")
    res = _cli("abliterate", run, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "refusal select" in res.text
    assert not (tmp_path / "o").exists()


# ---- llama.cpp (llama-cpp-python), when installed -----------------------------------------------------------


def _llama_logits(path: Path, ids: list[int], cvec: np.ndarray | None = None, n_embd: int = HIDDEN,
                  n_layers: int = 4) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    if cvec is not None:
        apply = next((getattr(llama_cpp, n) for n in ("llama_set_adapter_cvec", "llama_apply_adapter_cvec",
                                                       "llama_control_vector_apply") if hasattr(llama_cpp, n)), None)
        if apply is None:
            pytest.skip("this llama-cpp-python has no control-vector API")
        data = np.ascontiguousarray(cvec, dtype=np.float32)
        ptr = data.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
        assert apply(llm.ctx, ptr, data.size, n_embd, 1, n_layers - 1) == 0
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _close_to_llama_cpp(got: np.ndarray, want: np.ndarray) -> None:
    """llama.cpp keeps its KV cache in float16 (and rounds some activations), so its logits differ from float32
    transformers by about 1e-2; a wrong layout (rope order, orientation, a missed edit) differs by O(1)."""
    err = np.abs(got - want)
    print(f"llama.cpp vs transformers: max {err.max():.4f}, mean {err.mean():.5f}")
    assert err.max() < 0.05 and err.mean() < 5e-3


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_runs_the_exported_gguf(arch, tokenizer, tmp_path):
    """llama.cpp loads the abliterated GGUF (written from HF, and edited from a quantized GGUF) and gives the logits
    transformers gives for the same file."""
    m = build_model(arch, len(tokenizer))
    d = _dir()
    ids = _ids(tokenizer)[0].tolist()
    res = export_gguf(m, tokenizer, d, tmp_path / "abl.gguf")
    want = _load_gguf(res.path)(torch.tensor([ids])).logits[0].detach().numpy()
    _close_to_llama_cpp(_llama_logits(res.path, ids), want)
    src = write_gguf(m, tokenizer, tmp_path / "q8.gguf", dtype="q8_0").path
    edited = edit_gguf(src, d, tmp_path / "q8-abl.gguf").path
    want = _load_gguf(edited)(torch.tensor([ids])).logits[0].detach().numpy()
    got = _llama_logits(edited, ids)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999  # llama.cpp quantizes activations for Q8_0 matmuls


@pytest.mark.integration
def test_llama_cpp_control_vector_equals_refusal_add(tokenizer, tmp_path):
    """The control vector written for "add at the input of layer 2" steers llama.cpp like refusal's `add`."""
    import gguf

    m = build_model("llama", len(tokenizer))
    v = _dir(4)
    ids = _ids(tokenizer)[0].tolist()
    path = write_gguf(m, tokenizer, tmp_path / "m.gguf").path
    cv = write_control_vector(v, tmp_path / "cv.gguf", n_layers=4, model_hint="llama", layer=2, coeff=2.0)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(cv, "r").tensors}
    flat = np.concatenate([tensors[f"direction.{n}"] for n in range(1, 4)])  # llama.cpp's layout: layer 1 first
    with add(m, v, 2, coeff=2.0):
        want = m(torch.tensor([ids])).logits[0].detach().numpy()
    _close_to_llama_cpp(_llama_logits(path, ids, cvec=flat), want)
