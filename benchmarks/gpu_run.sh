#!/usr/bin/env bash
# On the lent GPU, after the GGUF parts are in /tmp/m (see benchmarks/README.md): the paper run timed end to end,
# then the 8B-shape stage benchmark. Results land in $OUT.
. benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m benchmarks.paper_run --model /tmp/m/hf --data .data/refusal_direction --out $OUT/h200-run.json
cp /tmp/runs/paper/summary.json $OUT/paper-summary.json
cp /tmp/runs/paper/completions.json $OUT/paper-completions.json
