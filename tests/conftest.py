"""Tiny randomly initialised chat models of several architectures, with a real BPE tokenizer and ChatML template
built in memory: no hub, no downloads."""

from __future__ import annotations

import json
import os
from importlib import resources

# Triton kernels run on the CPU in Triton's interpreter, which must be chosen before triton is first imported (its
# language functions are jitted then); the package uses a kernel on a CPU only when asked to explicitly
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    data = resources.files("refusal").joinpath("data", "builtin")
    out = []
    for name in ("harmful.json", "harmless.json"):
        out += [r["instruction"] for r in json.loads(data.joinpath(name).read_text("utf-8"))]
    phrases = json.loads(data.joinpath("refusal_phrases.json").read_text("utf-8"))
    return out + phrases["phrases"] + phrases["refusal_openings"] + ["user", "assistant", "system"]


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")
    fast.chat_template = CHATML
    fast.padding_side = "left"
    return fast


def build_model(arch: str, vocab: int, n_layers: int = 4, seed: int = 0):
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2,
                  pad_token_id=3, bos_token_id=1)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    elif arch == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**common, head_dim=16))
    else:
        raise ValueError(arch)
    # random init is tiny; larger weights make activations (and the tests) less degenerate
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.eval()
    model.requires_grad_(False)
    return model


ARCHS = ["llama", "qwen2", "gemma"]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch, tokenizer):
    return build_model(arch, len(tokenizer))


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A tiny Qwen2 chat model saved as a local Hugging Face folder."""
    m = build_model("qwen2", len(tokenizer), n_layers=3)
    d = tmp_path / "tiny-qwen2"
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _refusal_home(request, tmp_path_factory, monkeypatch):
    """Caches (model fingerprints) go to a temporary folder, never the user's; integration tests keep the real
    cache, where the catalog models were pulled."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("REFUSAL_HOME", str(tmp_path_factory.getbasetemp() / "refusal-home"))



@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory, tokenizer):
    """``(model folder, run folder)``: a tiny Qwen2 run with every stage finished, made once per session (the
    fault and selection tests copy it; none may modify it). Its caches go to the tests' temporary home."""
    import yaml
    from typer.testing import CliRunner

    from refusal.cli import app
    from refusal.data import builtin

    root = tmp_path_factory.mktemp("finished")
    model_dir = root / "tiny"
    build_model("qwen2", len(tokenizer), n_layers=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    h, b = root / "harmful.json", root / "harmless.json"
    h.write_text(json.dumps(builtin("harmful")[:8]))
    b.write_text(json.dumps(builtin("harmless")[:8]))
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"n_train": 3, "n_val": 2, "n_test": 2, "filter": False},
                                   "select": {"kl_threshold": 1e9, "induce_threshold": -1e9},
                                   "generate": {"max_new_tokens": 2, "kl": False}, "device": "cpu", "preset": "paper",
                                   "evaluate": {"cross_entropy": []}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_HOME", str(tmp_path_factory.getbasetemp() / "refusal-home"))
        r = CliRunner().invoke(app, ["run", "--model", str(model_dir), "--harmful", str(h), "--harmless", str(b),
                                     "--config", str(cfg), "--output", str(root / "runs"), "--name", "run"])
    assert r.exit_code == 0, r.output
    return model_dir, root / "runs" / "run"
