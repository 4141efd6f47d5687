#!/usr/bin/env bash
# Round 3's GPU measurements, by part (results in $OUT; each step's log, rc and seconds in $OUT/steps.txt):
#   bash benchmarks/gpu_round3.sh step8b    # "nothing slower", 8B decode step (random weights), before and after
#   bash benchmarks/gpu_round3.sh speed     # "nothing slower": the paper run with the code of
#                                           # the commit before the fidelity rule (.before/src, from `git archive`)
#                                           # and with today's, same machine, same call
#   bash benchmarks/gpu_round3.sh matrix    # the architecture matrix's CUDA paths (benchmarks.arch_matrix)
#   bash benchmarks/gpu_round3.sh keep      # refusal kept for some categories, released for others (issue 29)
#   bash benchmarks/gpu_round3.sh learned   # the cross-lingual run with learned refusal openings (issue 30)
#   DRY=1 OUT=/tmp/dry bash benchmarks/gpu_round3.sh speed   # the plumbing on the CPU (tiny model, no real weights)
# The real model (Qwen2.5-Coder-1.5B-Instruct) must be in /tmp/m as GGUF parts (benchmarks/README.md); carry .whl,
# .data (copies of ../shared/datasets' refusal_direction and polyrefuse) and, for `speed`, .before.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the "before" steps run from .before
. benchmarks/gpu_step.sh
if [ -z "${DRY:-}" ]; then
  if [ -f /tmp/m/part00 ] || [ -f /tmp/m/hf/config.json ]; then
    . benchmarks/gpu_setup.sh  # wheels, and the real model assembled and converted once
  else  # no model on this machine: wheels only (the parts that need no real weights)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONPYCACHEPREFIX=/tmp/pycache PYTHONUNBUFFERED=1
    unset PYTHONDONTWRITEBYTECODE
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
else
  export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
fi
D=.data/refusal_direction
ROOT=$PWD
NOW=$PYTHONPATH
BEFORE=${NOW/$PWD\/src:$PWD/$PWD/.before/src:$PWD/.before}  # the old package and the old benchmarks
for part in "$@"; do
  case $part in
  step8b)  # the 8B decode step (random weights) with the code before the fidelity rule and with today's
    if [ -z "${DRY:-}" ]; then
      (cd .before && PYTHONPATH=$BEFORE step step8b-before 240 python3 -m benchmarks.profile_generate \
        --arch llama3-8b --batch 64 --variants default --kernels 0 --out "$OUT/step8b-before.json")
      step step8b-after 240 python3 -m benchmarks.profile_generate --arch llama3-8b --batch 64 --variants default \
        --kernels 0 --out "$OUT/step8b-after.json"
    fi ;;
  speed)
    if [ -z "${DRY:-}" ]; then
      # the first run on a fresh machine pays cold caches: it warms them, and is kept apart
      step paper-warm 200 python3 -m benchmarks.paper_run --model /tmp/m/hf --data $D --out "$OUT/paper-warmup.json"
      for i in ${PAIRS:-1}; do
        (cd .before && PYTHONPATH=$BEFORE step paper-before-$i 200 python3 -m benchmarks.paper_run --model /tmp/m/hf \
          --data "$ROOT/$D" --out "$OUT/paper-before-$i.json")
        step paper-after-$i 200 python3 -m benchmarks.paper_run --model /tmp/m/hf --data $D \
          --out "$OUT/paper-after-$i.json"
      done
      cp /tmp/runs/paper/summary.json "$OUT/paper-after-summary.json"
      cp /tmp/runs/paper/completions.json "$OUT/paper-after-completions.json"
    else
      (cd .before && PYTHONPATH=$BEFORE step step-before 300 python3 -m benchmarks.profile_generate --arch tiny \
        --batch 2 --new-tokens 4 --variants default --kernels 0 --out "$OUT/step-before.json")
      step step-after 300 python3 -m benchmarks.profile_generate --arch tiny --batch 2 --new-tokens 4 \
        --variants default --kernels 0 --out "$OUT/step-after.json"
    fi ;;
  matrix)
    step matrix 420 python3 -m benchmarks.arch_matrix --out "$OUT/arch-matrix-cuda.json" ;;
  keep)
    step keep 300 python3 -m benchmarks.keep_refusal --model /tmp/m/hf --data $D --keep "${KEEP:-Sexual content,Violence}" \
      --out "$OUT/keep-refusal.json" ;;
  learned)
    # both runs resume: a call cut off at its limit is simply repeated (ONLY=shipped, then ONLY=learned, then none)
    step learned-${ONLY:-tables} 560 python3 -m benchmarks.learned_openings --crosslingual --model /tmp/m/hf \
      --polyrefuse .data/polyrefuse --paper $D --runs /tmp/runs --out "$OUT/learned-openings.json" \
      ${ONLY:+--only $ONLY}
    if [ -z "${ONLY:-}" ]; then
      tar czf "$OUT/learned-openings-runs.tgz" -C /tmp/runs --exclude='*.safetensors' learned-openings-learned \
        learned-openings-shipped
    fi ;;
  *) echo "unknown part $part"; exit 2 ;;
  esac
done
cat "$OUT/steps.txt"
