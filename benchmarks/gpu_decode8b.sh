#!/usr/bin/env bash
# The 8B decode experiments for issue 9's 60 % target on the lent GPU; random weights, no model files, ~5 min:
#   bash benchmarks/gpu_decode8b.sh                        # results in $OUT (default /tmp/out)
#   DRY=1 OUT=/tmp/dry bash benchmarks/gpu_decode8b.sh     # a CPU check of the plumbing (tiny model, GPU-only steps
#                                                          # skipped)
# 1. the whole step: the default decoder; with programmatic dependent launch for inductor's kernels; and also for
#    the attention and MLP kernels (benchmarks.profile_generate variants pdl, pdl-all), each variant's tokens checked
#    against a plain forward of the model;
# 2. if pdl-all beats the default by more than 0.03 ms a step: benchmarks.pipeline with it on ($OUT/h200-pdl.json).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
unset PYTHONDONTWRITEBYTECODE  # the GPU machine ships no bytecode: keep it, outside the tree
export PYTHONPYCACHEPREFIX=/tmp/pycache
. benchmarks/gpu_step.sh
VARIANTS=${VARIANTS:-default,pdl,pdl-all}
PDL_ON="import torch._inductor.config as c; c.triton.enable_pdl = True
from refusal.generation import attention_kernel; attention_kernel.LAUNCH_PDL = True"
if [ -z "${DRY:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  step variants 300 python3 -m benchmarks.profile_generate --arch llama3-8b --batch 64 --variants $VARIANTS \
    --kernels 30 --out "$OUT/decode-variants-8b.json"
  if python3 -c "import json, sys; v = json.load(open('$OUT/decode-variants-8b.json'))['variants']
sys.exit(0 if v['pdl-all'].get('ms_per_step', 1e9) < v['default']['ms_per_step'] - 0.03 else 1)"; then
    step pipeline_pdl 240 python3 -c "$PDL_ON
import runpy, sys
sys.argv = ['pipeline', '--arch', 'llama3-8b', '--gen-batches', '64', '--sweep-select-batch', '', '--budget-s', '200',
            '--out', '$OUT/h200-pdl.json']
runpy.run_module('benchmarks.pipeline', run_name='__main__')"
  fi
else
  step variants 300 python3 -m benchmarks.profile_generate --arch tiny --batch 2 --new-tokens 4 --variants $VARIANTS \
    --out "$OUT/decode-variants-8b.json"
fi
cat "$OUT/steps.txt"
