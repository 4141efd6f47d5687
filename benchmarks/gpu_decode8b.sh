#!/usr/bin/env bash
# The 8B decode experiments for issue 9's 60 % target on the lent GPU; random weights, no model files, ~6 min:
#   bash benchmarks/gpu_decode8b.sh                        # results in $OUT (default /tmp/out)
#   DRY=1 OUT=/tmp/dry bash benchmarks/gpu_decode8b.sh     # a CPU check of the plumbing (tiny model, GPU-only steps
#                                                          # skipped)
# 1. the decoding attention kernel against gqa_attention in bf16/fp16/fp32 (after its split into jitted functions);
# 2. benchmarks.l2_prefetch: the o weight brought into L2 while the attention runs, per layer;
# 3. the whole step: the default decoder, with that prefetch, with inductor's combo kernels, with aggressive fusion.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
unset PYTHONDONTWRITEBYTECODE  # the GPU machine ships no bytecode: keep it, outside the tree
export PYTHONPYCACHEPREFIX=/tmp/pycache
. benchmarks/gpu_step.sh
VARIANTS=default,prefetch,combo,aggressive
if [ -z "${DRY:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  step kernel_check 60 python3 -m benchmarks.decode_attention --check
  step l2_prefetch 150 python3 -m benchmarks.l2_prefetch --out "$OUT/l2-prefetch-8b.json"
  step variants 330 python3 -m benchmarks.profile_generate --arch llama3-8b --batch 64 --variants $VARIANTS \
    --kernels 30 --out "$OUT/decode-variants-8b.json"
else
  step variants 300 python3 -m benchmarks.profile_generate --arch tiny --batch 2 --new-tokens 4 --variants $VARIANTS \
    --out "$OUT/decode-variants-8b.json"
fi
cat "$OUT/steps.txt"
