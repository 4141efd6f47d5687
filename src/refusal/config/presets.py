"""Presets: settings between the built-in defaults and the user's file and flags."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's sizes are the defaults. Decoding captures the eager step into CUDA graphs (same tokens as
    # model.generate, set up in a second where a compile costs a minute). Off a GPU it is plain static-cache decoding.
    "paper": {"generate": {"static_cache": "graphs"}},
    # Sized for a 2-core CPU: the whole pipeline in under 10 minutes (see docs/results.md). Fewer prompts,
    # every fourth layer, bypass/KL only where induce passes, short completions (refusal phrases come first).
    "cpu": {
        "data": {"n_train": 24, "n_val": 6, "n_test": 12, "filter": False},
        "select": {"prune": True, "layer_stride": 4},
        "generate": {"max_new_tokens": 24, "kl": False},
        "evaluate": {"cross_entropy": []},  # on two cores, CE under five conditions costs as much as generation
    },
}
