#!/usr/bin/env bash
# The 8B decode measurements for issue 9's 60 % target on the lent GPU; random weights, no model files, ~5 min:
#   bash benchmarks/gpu/decode8b.sh                        # results in $OUT (default /tmp/out)
#   DRY=1 OUT=/tmp/dry bash benchmarks/gpu/decode8b.sh     # a CPU check of the plumbing (tiny model, GPU-only steps
#                                                          # skipped)
# 1. the decoding attention and MLP kernels against torch in bf16/fp16/fp32;
# 2. the MLP kernel's launch configurations against cuBLAS's gate/up GEMM + SiLU·mul (benchmarks.kernels.mlp_kernel);
# 3. the whole step with the sweep's best configuration: the default decoder, without combo kernels, without the MLP
#    kernel, with programmatic dependent launch; each variant's tokens checked against a plain forward of the model.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
unset PYTHONDONTWRITEBYTECODE  # the GPU machine ships no bytecode: keep it, outside the tree
export PYTHONPYCACHEPREFIX=/tmp/pycache
. benchmarks/gpu_step.sh
VARIANTS=${VARIANTS:-default,combo-off,mlp-kernel-off,pdl}
if [ -z "${DRY:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  step attention_check 60 python3 -m benchmarks.kernels.decode_attention --check
  step mlp_check 60 python3 -m benchmarks.kernels.mlp_kernel --check
  step mlp_sweep 150 python3 -m benchmarks.kernels.mlp_kernel --arch llama3-8b --rows 64 --out "$OUT/mlp-kernel-8b.json"
  step variants 330 python3 -m benchmarks.kernels.mlp_kernel --use-best "$OUT/mlp-kernel-8b.json" -- \
    -m benchmarks.speed.profile_generate --arch llama3-8b --batch 64 --variants $VARIANTS --kernels 30 \
    --out "$OUT/decode-variants-8b.json"
else
  step variants 300 python3 -m benchmarks.speed.profile_generate --arch tiny --batch 2 --new-tokens 4 --variants $VARIANTS \
    --out "$OUT/decode-variants-8b.json"
fi
cat "$OUT/steps.txt"
