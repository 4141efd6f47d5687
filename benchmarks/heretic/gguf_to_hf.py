#!/usr/bin/env python3
"""Convert a GGUF chat model to a bf16 Hugging Face folder (what heretic loads).

    python3 gguf_to_hf.py /tmp/m/model.gguf /tmp/m/hf [--dtype bfloat16]

transformers dequantizes the GGUF (needs the `gguf` package); save_pretrained
refuses a GGUF-loaded model until its quantizer marker and
config.quantization_config are cleared, which this does.  Skips the work if
OUT_DIR already holds a config.json.
"""

import argparse
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args(argv)
    if os.path.exists(os.path.join(a.out_dir, "config.json")):
        print(f"{a.out_dir} already converted")
        return 0
    t0 = time.perf_counter()
    folder, name = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, a.dtype))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "_is_quantized"):
        try:
            setattr(model, attr, False)
        except Exception:
            pass
    model.save_pretrained(a.out_dir)
    tok.save_pretrained(a.out_dir)
    print(f"converted {a.gguf} -> {a.out_dir} ({model.dtype}, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
