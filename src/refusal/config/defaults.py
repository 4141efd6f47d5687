"""Defaults shared by several settings: the default model, one generation budget per purpose, the batch sizes chosen
from the device when none is set."""

from __future__ import annotations

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"

# ---- one generation budget per purpose (tokens) -----------------------------------------------------------------
GENERATE_MAX_NEW_TOKENS = 256  # generate.max_new_tokens: the test completions of every condition
SELECT_JUDGE_MAX_NEW_TOKENS = 32  # select.judge_max_new_tokens: completions judged by a judge objective
OVER_REFUSAL_MAX_NEW_TOKENS = 64  # evaluate.over_refusal.max_new_tokens: completions of the contrast prompts
JUDGE_MAX_NEW_TOKENS = 8  # an llm judge's answer (max_new_tokens) and an openai judge's (max_tokens): one label
CHAT_MAX_NEW_TOKENS = 256  # `refusal chat`: most tokens per answer

# ---- batch sizes chosen from the device when not set: (on a GPU, on a CPU) ---------------------------------------
EXTRACT_BATCH = (64, 16)  # sequences per forward when reading activations
GENERATE_BATCH = (512, 64)  # sequences decoded together (every condition's rows share batches)
CROSS_ENTROPY_BATCH = (32, 8)  # every position's logits are kept: smaller than the others
SCORE_BATCH_FACTOR = 64  # on a GPU, a scoring forward (last position only) takes this many times extract's batch
