"""The tiny random chat model the benchmark scripts' dry runs use (``DRY=1``/``--tiny``): a 3-layer Qwen2 with a
byte-level BPE tokenizer trained on the given corpus and a ChatML template, saved as a Hugging Face folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def save_tiny_qwen2(folder: Path, corpus: Iterable[str], *, max_positions: int = 512) -> Path:
    """Build the model and tokenizer (seeded) and save both into ``folder``; returns ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>",
                                                                  "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([*corpus, "user", "assistant", "system"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                                         bos_token_id=fast.convert_tokens_to_ids("<|im_start|>"),
                                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
