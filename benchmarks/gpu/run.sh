#!/usr/bin/env bash
# On the lent GPU, after the GGUF parts are in /tmp/m (see benchmarks/README.md): the paper run timed end to end,
# then the 8B-shape stage benchmark. Results land in $OUT.
. benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m benchmarks.speed.paper_run --model /tmp/m/hf --data .data/refusal_direction --out $OUT/h200-run.json
cp /tmp/runs/paper/summary.json $OUT/paper-summary.json
cp /tmp/runs/paper/completions.json $OUT/paper-completions.json
# the 8B shape (random bf16 weights): extraction, selection against the naive loop, generation against the HBM bound
python3 -m benchmarks.speed.pipeline --arch llama3-8b --gen-batches 64 --sweep-select-batch "" --budget-s 240 \
  --out $OUT/h200.json 2>&1 | grep -v "FutureWarning\|forward_call"
