"""export/adapter.py and `refusal abliterate RUN --adapter OUT`: the weight edit as a PEFT LoRA adapter, equal to the
merged export when loaded with peft."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_model
from safetensors import safe_open
from safetensors.torch import load_file

from refusal.directions.base import Direction
from refusal.errors import RefusalError
from refusal.export.adapter import export_adapter, lora_factors, vllm_max_lora_rank
from refusal.export.hf import export_hf
from refusal.interventions.weights import orthogonalized

peft = pytest.importorskip("peft")

HIDDEN = 64
VOCAB = 300


class _NoTokenizer:
    def save_pretrained(self, path) -> None:
        pass


def _ids():
    return torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _dir(seed: int = 1, *shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (HIDDEN,)), generator=torch.Generator().manual_seed(seed))


def _model(arch: str):
    m = build_model(arch, VOCAB)
    with torch.no_grad():  # norm weights away from their init, so a wrong edit of the tied head would show
        for name, p in m.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.normal_(1.0 if arch != "gemma" else 0.0, 0.3)
    return m


def _peft_logits(model, folder: Path, ids) -> torch.Tensor:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model, folder).eval()
    try:
        return pm(ids).logits
    finally:
        pm.unload()  # the caller's base model back without LoRA layers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("k", [1, 2])
def test_adapter_equals_merged_export(arch, k, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    m = _model(arch)
    ids = _ids()
    d = Direction(_dir(3, k, HIDDEN), layer=2, pos=-1, model="sha256:" + "ab" * 32)
    base = m(ids).logits
    ad = export_adapter(m, d, tmp_path / "adapter", base_model="org/tiny", card={"run": "run-7"})
    torch.testing.assert_close(m(ids).logits, base)  # the caller's model is unchanged
    merged = export_hf(m, _NoTokenizer(), d, tmp_path / "merged")
    want = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    assert (want - base).abs().max() > 0.1  # the edit matters on this model
    got = _peft_logits(m, ad, ids)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)

    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == cfg["lora_alpha"] == k and cfg["base_model_name_or_path"] == "org/tiny"
    assert cfg["target_modules"][0] == "model.embed_tokens" and len(cfg["target_modules"]) == 1 + 2 * 4
    readme = (ad / "README.md").read_text()
    assert "sha256:" + "ab" * 32 in readme and "direction layer**: 2" in readme and "run-7" in readme
    assert f"--max-lora-rank {vllm_max_lora_rank(k)}" in readme and "base_model: org/tiny" in readme
    with safe_open(str(ad / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata()["refusal.model_identity"] == "sha256:" + "ab" * 32
    a_size = (ad / "adapter_model.safetensors").stat().st_size
    m_size = (merged / "model.safetensors").stat().st_size
    with capsys.disabled():
        print(f"\n{arch} k={k}: adapter {a_size} B, merged model {m_size} B ({a_size / m_size:.2%})")
    assert a_size < 0.05 * m_size


def test_keys_and_shapes_match_peft_own_save(tmp_path):
    """The file a PEFT LoraConfig with our adapter_config would save has the same names and shapes."""
    from peft import LoraConfig, get_peft_model

    m = _model("qwen2")
    ad = export_adapter(m, _dir(3, 2, HIDDEN), tmp_path / "ours")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    ref = get_peft_model(_model("qwen2"), LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"}))
    ref.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(ad / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    with warnings.catch_warnings(record=True) as caught:  # every key of our config is one PEFT knows
        warnings.simplefilter("always")
        loaded = peft.PeftConfig.from_pretrained(str(ad))
    assert loaded.r == 2 and not [w for w in caught if "Unexpected keyword" in str(w.message)]
    assert "do not `merge_and_unload()`" in (ad / "README.md").read_text()  # qwen2 ties its head


def test_per_layer_bases_options_and_padding(tmp_path):
    """Per-layer bases of different ranks (zero-padded to one r), layer weights and orthogonal-to-harmless: the
    adapter equals orthogonalization with the same options."""
    m = _model("llama")
    ids = _ids()
    per_layer = torch.stack([_dir(10 + i, 2, HIDDEN) for i in range(4)])
    per_layer[0, 1] = 2 * per_layer[0, 0]  # layer 0 (and the embedding): rank 1, the others rank 2
    opts = {"layer_weights": [1.0, 0.5, 0.0, 2.0], "orthogonal_to_harmless": _dir(9)}
    with orthogonalized(m, per_layer, **opts):
        want = m(ids).logits
    ad = export_adapter(m, per_layer, tmp_path / "ad", **opts)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and not any(".layers.2." in t for t in cfg["target_modules"])  # weight 0: left out
    torch.testing.assert_close(_peft_logits(m, ad, ids), want, atol=5e-5, rtol=1e-5)
    ranks = [f.rank for f in lora_factors(m, per_layer, **opts)]
    assert ranks[:4] == [1, 1, 1, 2]  # the embedding and layer 0's two writers use basis 0; layer 1 has two rows


def test_refusals(tmp_path):
    m = _model("llama")
    with pytest.raises(RefusalError, match="not a\\s+low-rank change"):
        export_adapter(m, _dir(), tmp_path / "np", norm_preserving=True)
    biased = build_model("llama", VOCAB)
    biased = type(biased)(type(biased.config)(**{**biased.config.to_dict(), "attention_bias": True})).eval()
    with torch.no_grad():
        for layer in biased.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    export_adapter(biased, _dir(), tmp_path / "zero-bias")  # zero biases: nothing for LoRA to miss
    with torch.no_grad():
        biased.model.layers[1].self_attn.o_proj.bias.normal_()
    with pytest.raises(RefusalError, match="bias of model.layers.1.self_attn.o_proj"):
        export_adapter(biased, _dir(), tmp_path / "bias")
    (tmp_path / "exists").mkdir()
    with pytest.raises(RefusalError, match="already exists"):
        export_adapter(m, _dir(), tmp_path / "exists")
    with pytest.raises(RefusalError, match="hidden size"):
        export_adapter(m, torch.ones(HIDDEN + 1), tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "zero-bias"]
    assert vllm_max_lora_rank(1) == 1 and vllm_max_lora_rank(2) == 8 and vllm_max_lora_rank(300) == 320


# ---- cli ---------------------------------------------------------------------------------------------------------


def _run_dir(tmp_path: Path, spec: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"model: {spec}\ndtype: float32\n")
    Direction(_dir(), layer=2, pos=-1, scores={"kl": 0.02}).save(run / "direction.safetensors")
    return run


def _cli(*args):
    from typer.testing import CliRunner

    from refusal.cli.app import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    res.text = " ".join(res.output.split())
    return res


def test_cli_abliterate_adapter(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from refusal.models.identity import fingerprint

    run = _run_dir(tmp_path, str(model_dir))
    res = _cli("abliterate", run, "--adapter", tmp_path / "lora", "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = _cli("abliterate", run, "--out", tmp_path / "merged", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ids = torch.randint(4, 400, (2, 10), generator=torch.Generator().manual_seed(0))
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.testing.assert_close(_peft_logits(base, tmp_path / "lora", ids), want, atol=5e-5, rtol=1e-5)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(model_dir).resolve())
    readme = (tmp_path / "lora" / "README.md").read_text()
    assert f"sha256:{fingerprint(model_dir)}" in readme and "**run**: run" in readme

    res = _cli("abliterate", run, "--adapter", tmp_path / "lora", "--device", "cpu")
    assert res.exit_code == 2 and "already exists" in res.text
    res = _cli("abliterate", run, "--adapter", tmp_path / "np", "--norm-preserving")
    assert res.exit_code == 2 and "not a low-rank change" in res.text
    res = _cli("abliterate", run)
    assert res.exit_code == 2 and "exactly one of --out" in res.text
    res = _cli("abliterate", run, "--out", tmp_path / "x", "--adapter", tmp_path / "y")
    assert res.exit_code == 2 and "exactly one of --out" in res.text
    assert not (tmp_path / "np").exists() and not (tmp_path / "y").exists()


def test_cli_adapter_for_a_gguf_model(tmp_path, tokenizer):
    """A run on a .gguf file: the adapter applies to the model transformers dequantizes from it, and says so."""
    from transformers import AutoModelForCausalLM

    from refusal.export.gguf import write_gguf

    src = write_gguf(build_model("llama", len(tokenizer), n_layers=3), tokenizer, tmp_path / "m.gguf",
                     dtype="f32").path
    run = _run_dir(tmp_path, str(src))
    res = _cli("abliterate", run, "--adapter", tmp_path / "lora", "--device", "cpu")
    assert res.exit_code == 0, res.output
    base = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name).eval()
    ids = torch.randint(4, 400, (2, 10), generator=torch.Generator().manual_seed(0))
    with orthogonalized(base, Direction.load(run / "direction.safetensors")):
        want = base(ids).logits
    torch.testing.assert_close(_peft_logits(base, tmp_path / "lora", ids), want, atol=5e-5, rtol=1e-5)
    readme = " ".join((tmp_path / "lora" / "README.md").read_text().split())
    assert "dequantized by transformers" in readme and "gguf_file=NAME" in readme


# ---- fused experts (transformers 5 MoE: one 3-D parameter for all experts) ----------------------------------------


def _moe(family: str):
    import archs

    m = archs.build(family, VOCAB)
    with torch.no_grad():  # gpt-oss: random biases on o_proj and the experts would (rightly) be refused
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.bias", "down_proj_bias")):
                p.zero_()
    return m


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_fused_experts_adapter_equals_merged_export_and_hooks(family, tmp_path):
    """Fused expert weights go through PEFT's target_parameters: base + adapter equals the merged export and hook
    ablation. qwen3_moe has a dense first layer (its mlp.down_proj is a Linear that PEFT's v4→v5 MoE renaming would
    drop from target_modules); gpt_oss stores its experts transposed (is_transposed, residual axis last)."""
    from transformers import AutoModelForCausalLM

    from refusal.interventions.hooks import ablate
    from refusal.models.writers import residual_writers

    m = _moe(family)
    fused = [wr.name for wr in residual_writers(m) if wr.fused]
    assert fused  # the layout this test is about
    ids = _ids()
    d = _dir(3, 2, HIDDEN)
    base = m(ids).logits
    with ablate(m, d):
        hooked = m(ids).logits
    ad = export_adapter(m, d, tmp_path / "adapter")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert set(fused) <= set(cfg["target_parameters"])
    assert not any(t.endswith(("down_proj", "w2")) for t in cfg["target_modules"])
    merged = export_hf(m, _NoTokenizer(), d, tmp_path / "merged")
    want = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    assert (want - base).abs().max() > 0.1  # the edit matters on this model
    got = _peft_logits(m, ad, ids)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(got, hooked, atol=5e-4, rtol=1e-4)
    assert "target_parameters" in (ad / "README.md").read_text()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_keys_and_shapes_match_peft_own_save(family, tmp_path):
    """PEFT's own ParamWrapper, built from our adapter_config, saves the same names and shapes (lora_A (E·r, in),
    lora_B (out, r·E) for a fused parameter); and loading ours wraps exactly the parameters we name."""
    from peft import LoraConfig, PeftModel, get_peft_model

    ad = export_adapter(_moe(family), _dir(3, 2, HIDDEN), tmp_path / "ours")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    ref = get_peft_model(_moe(family), LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"}))
    ref.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(ad / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert any(v.shape[0] == 4 * 2 for k, v in ours.items() if "experts.lora_A" in k)  # 4 experts, rank 2
    pm = PeftModel.from_pretrained(_moe(family), ad)
    wrapped = {f"{n.removeprefix('base_model.model.')}.{mod.parameter_name}" for n, mod in pm.named_modules()
               if type(mod).__name__ == "ParamWrapper"}
    assert wrapped == set(cfg["target_parameters"])


def test_fused_experts_when_peft_reads_the_other_axis_as_output(tmp_path):
    """A fused weight whose module says is_transposed although its residual axis is 1: PEFT then treats the residual
    axis as its input, and the factors swap roles (B_e = (B̂W_e)ᵀ, A_e = −s·B̂). Checked on the weights PEFT merges."""
    from peft import PeftModel

    from refusal.interventions.weights import orthogonalize_
    from refusal.models.writers import residual_writers

    m = _moe("mixtral")
    fused = [wr for wr in residual_writers(m) if wr.fused]
    assert all(wr.axis == 1 and tuple(wr.weight.shape) == (4, HIDDEN, 128) for wr in fused)
    for wr in fused:
        wr.module.is_transposed = True  # only PEFT's reading changes; the forward pass is not used here
    d = _dir(5, 2, HIDDEN)
    ad = export_adapter(m, d, tmp_path / "ad", layer_weights=[1.0, 0.5, 0.0, 2.0])
    want = _moe("mixtral")
    orthogonalize_(want, d, layer_weights=[1.0, 0.5, 0.0, 2.0])
    merged = PeftModel.from_pretrained(m, ad).merge_and_unload()
    for name, p in want.named_parameters():
        if "experts.down_proj" in name:
            torch.testing.assert_close(merged.get_parameter(name), p, atol=1e-5, rtol=1e-5)


def test_fused_expert_bias_along_the_direction_is_refused(tmp_path):
    import archs

    m = archs.build("gpt_oss", VOCAB)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("o_proj.bias"):
                p.zero_()
    with pytest.raises(RefusalError, match="bias of model.layers.0.mlp.experts"):
        export_adapter(m, _dir(), tmp_path / "bias")
    assert not (tmp_path / "bias").exists()
