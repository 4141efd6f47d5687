#!/usr/bin/env bash
# The 8B decode measurements for issue 9's 60 % target on the lent GPU; random weights, no model files, ~7 min:
#   bash benchmarks/gpu_decode8b.sh                        # results in $OUT (default /tmp/out)
#   DRY=1 OUT=/tmp/dry bash benchmarks/gpu_decode8b.sh     # a CPU check of the plumbing (tiny model, GPU-only steps
#                                                          # skipped)
# 1. the decoding attention, MLP and linear kernels against torch in bf16/fp16/fp32;
# 2. the linear kernel's launch configurations against cuBLAS at the o, down and lm_head shapes
#    (benchmarks.gemm_decode); MLP_SWEEP=1 also sweeps the MLP kernel's (benchmarks.mlp_kernel; else the stored
#    sweep of 2026-12-02 is used);
# 3. the whole step with the sweeps' best configurations: $VARIANTS of benchmarks.profile_generate, each variant's
#    tokens checked against a plain forward of the model.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
unset PYTHONDONTWRITEBYTECODE  # the GPU machine ships no bytecode: keep it, outside the tree
export PYTHONPYCACHEPREFIX=/tmp/pycache
. benchmarks/gpu_step.sh
VARIANTS=${VARIANTS:-default,linear-off,linear-down,linear-lm_head,linear-all}
MLP=benchmarks/results/h200-2026-12-02-seventh/mlp-kernel-8b.json
if [ -z "${DRY:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  step attention_check 60 python3 -m benchmarks.decode_attention --check
  step mlp_check 60 python3 -m benchmarks.mlp_kernel --check
  step linear_check 60 python3 -m benchmarks.gemm_decode --check
  if [ -n "${MLP_SWEEP:-}" ]; then
    MLP=$OUT/mlp-kernel-8b.json
    step mlp_sweep 150 python3 -m benchmarks.mlp_kernel --arch llama3-8b --rows 64 --out "$MLP"
  fi
  step gemm_sweep 200 python3 -m benchmarks.gemm_decode --arch llama3-8b --rows 64 --only o,down,lm_head \
    --out "$OUT/gemm-decode-8b.json"
  step variants 420 python3 -m benchmarks.mlp_kernel --use-best "$MLP,$OUT/gemm-decode-8b.json" -- \
    -m benchmarks.profile_generate --arch llama3-8b --batch 64 --variants $VARIANTS --kernels 30 \
    --out "$OUT/decode-variants-8b.json"
else
  step variants 300 python3 -m benchmarks.profile_generate --arch tiny --batch 2 --new-tokens 4 --variants $VARIANTS \
    --out "$OUT/decode-variants-8b.json"
fi
cat "$OUT/steps.txt"
