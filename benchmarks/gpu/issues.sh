#!/usr/bin/env bash
# The measurements the open issues ask for, on the lent GPU, in three calls of at most 10 minutes each:
#   bash benchmarks/gpu/issues.sh a   # paper run timed (issue 9), evaluation suite (12), judge objective (12),
#                                     # INLP families x scopes (10)
#   bash benchmarks/gpu/issues.sh b   # export vs hooks, edit options, edit search vs heretic, direction sets (11)
#   bash benchmarks/gpu/issues.sh c   # cross-lingual (13): 7 languages, transfer and similarity matrices, heatmaps
#                                     # (WITH_SW_AM=1: then 9, with the model's own sw/am translations)
#   bash benchmarks/gpu/issues.sh d   # fresh machine: paper run timed, lm-eval per condition (12), 6 languages
#   bash benchmarks/gpu/issues.sh e   # fresh machine: paper run timed (9), edit search vs heretic (11)
#   bash benchmarks/gpu/issues.sh f   # fresh machine: paper run timed with prefix-shared generation, 8B decode profile (9)
#   bash benchmarks/gpu/issues.sh g   # fresh machine: paper run timed (9), edit search in heretic's protocol (11)
#   bash benchmarks/gpu/issues.sh h   # heretic 1.4.0 on the same GPU kind, for the wall-time comparison (11)
#   bash benchmarks/gpu/issues.sh i   # fresh machine: the paper run twice, then with model.generate decoding (9)
# On the GPU: the GGUF parts in /tmp/m and the wheels in .whl (see gpu_setup.sh); .data holds copies of the team's
# datasets (refusal_direction, polyrefuse, text, benchmarks). A CPU check of the plumbing, in minutes:
#   DRY=1 MODEL=/tmp/tiny-qwen OUT=/tmp/out bash benchmarks/gpu/issues.sh a
# Every step's log and results land in $OUT; a step that fails or runs out of its time does not stop the next.
set -u
PART=${1:?usage: gpu_issues.sh a|b|c|d|e|f|g|h|i}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -z "${DRY:-}" ]; then
  . benchmarks/gpu_setup.sh
  MODEL=/tmp/m/hf
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
else
  export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
  MODEL=${MODEL:?set MODEL to a small HF folder}
fi
D=$PWD/.data/refusal_direction
RUNS=${RUNS:-/tmp/runs}
C=/tmp/cfg
SMALL=${DRY:+--n 4}  # a CPU check scores 4 prompts of each kind
python3 -m benchmarks.gpu.configs $C --data .data --judge "$MODEL" ${DRY:+--dry} >/dev/null
FLAGS="--model $MODEL --preset paper --harmful $D --harmless $D --harmful-test $D/processed/jailbreakbench.json
  --output $RUNS"

. benchmarks/gpu_step.sh

paper_run() {  # paper_run RESULT.json: the paper run timed from the command to summary.json into $OUT/RESULT.json
  # (a dry run: the same stages on the tiny model, untimed)
  if [ -z "${DRY:-}" ]; then
    step paper 150 python3 -m benchmarks.speed.paper_run --model "$MODEL" --data "$D" --out "$OUT/$1" --runs $RUNS
  else
    rm -rf $RUNS/paper
    step paper 240 python3 -m refusal run $FLAGS --name paper --config $C/base.yaml
  fi
}

keep() {  # keep RUN_DIR DEST: copy a run's small results (JSON, PNG, config) into $OUT/DEST
  mkdir -p "$OUT/$2"
  find "$1" -maxdepth 1 -type f \( -name "*.json" -o -name "*.png" -o -name "*.yaml" -o -name "*.md" \) \
    -size -20M -exec cp {} "$OUT/$2/" \;
}

case $PART in
a)
  if [ -z "${DRY:-}" ]; then
    step paper 240 python3 -m benchmarks.speed.paper_run --model "$MODEL" --data "$D" --out "$OUT/h200-run.json" --runs $RUNS
  else
    rm -rf $RUNS/paper
    step paper 240 python3 -m refusal run $FLAGS --name paper --config $C/base.yaml
  fi
  keep $RUNS/paper paper
  step eval_suite 240 python3 -m refusal evaluate $RUNS/paper --config $C/eval-suite.yaml
  keep $RUNS/paper eval
  step report 60 python3 -m refusal report $RUNS/paper --out "$OUT/eval/report"
  rm -rf $RUNS/judgepick && cp -r $RUNS/paper $RUNS/judgepick
  step judge_pick 150 python3 -m refusal run $RUNS/judgepick --config $C/judge-pick.yaml
  keep $RUNS/judgepick judgepick
  rm -rf $RUNS/inlp
  step inlp 300 python3 -m refusal run $FLAGS --name inlp --config $C/inlp-families.yaml
  keep $RUNS/inlp inlp
  ;;
b)
  rm -rf /tmp/abl
  step abliterate 90 python3 -m refusal abliterate $RUNS/paper --out /tmp/abl
  cp /tmp/abl/README.md "$OUT/abliterated-model-card.md" 2>/dev/null
  step export_check 120 python3 -m benchmarks.fidelity.export_check $RUNS/paper /tmp/abl --out "$OUT/export_check.json" $SMALL
  step edit_options 90 python3 -m benchmarks.quality.edit_options $RUNS/paper --out "$OUT/edit_options.json"
  step edit_search 240 python3 -m benchmarks.quality.edit_search $RUNS/paper --out "$OUT/edit_search.json" $SMALL ${DRY:+--top 1}
  step sets 150 python3 -m refusal sets $RUNS/paper --k 3 --beam 4 --kl-weight 0
  keep $RUNS/paper sets
  ;;
c)
  L7=en,fr,es,de,ru,zh,th
  # PolyRefuse has no harmless_test_zh: Chinese harmless prompts are drawn from its train + val files instead
  python3 -c "import json, sys; p = '.data/polyrefuse/harmless_{}_zh.json'; rows = [r for s in ('train', 'val')
for r in json.load(open(p.format(s)))]; json.dump(rows, open('/tmp/harmless_zh.json', 'w'), ensure_ascii=False)"
  XFLAGS="--model $MODEL --polyrefuse $PWD/.data/polyrefuse --paper $D --output $RUNS --name crosslingual
    --config $C/crosslingual.yaml --files zh:harmless=/tmp/harmless_zh.json"
  step crosslingual7 ${XL_SECONDS:-420} python3 -m refusal crosslingual $XFLAGS --languages $L7
  keep $RUNS/crosslingual crosslingual7
  tar czf "$OUT/crosslingual7.tgz" -C $RUNS --exclude='*.safetensors' --exclude='*.partial.json' crosslingual
  if [ -n "${WITH_SW_AM:-}" ]; then  # Swahili and Amharic, translated by the model itself (flagged translations)
    step crosslingual9 280 python3 -m refusal crosslingual $XFLAGS --languages $L7,sw,am --allow-flagged
    keep $RUNS/crosslingual crosslingual9
  fi
  ;;
e)  # on a fresh machine: the paper run timed (issue 9), then the edit search against heretic (issue 11)
  paper_run h200-run-3.json
  keep $RUNS/paper paper
  # validation grown to 128 prompts of each kind from the unused train/val prompts (the run's 17 filtered harmful
  # validation prompts called every kept option 0 refusals), finer strengths, the 3 best directions
  step edit_search ${EDIT_SECONDS:-400} python3 -m benchmarks.quality.edit_search $RUNS/paper --out "$OUT/edit_search.json" \
    --val-pool $D --n-val 128 --top 3 --keep 8 --strengths 0.8,0.9,1.0,1.1,1.2 $SMALL ${DRY:+--top 1 --n-val 10}
  ;;
d)  # on a fresh machine: the paper run again (timed), lm-eval under its conditions, cross-lingual without th/sw/am
  if [ -z "${DRY:-}" ]; then
    step paper 150 python3 -m benchmarks.speed.paper_run --model "$MODEL" --data "$D" --out "$OUT/h200-run-2.json" \
      --runs $RUNS
  fi
  step benchmarks ${BENCH_SECONDS:-200} python3 -m refusal evaluate $RUNS/paper --config $C/benchmarks-only.yaml
  keep $RUNS/paper benchmarks
  python3 -c "import json, sys; p = '.data/polyrefuse/harmless_{}_zh.json'; rows = [r for s in ('train', 'val')
for r in json.load(open(p.format(s)))]; json.dump(rows, open('/tmp/harmless_zh.json', 'w'), ensure_ascii=False)"
  step crosslingual6 ${XL_SECONDS:-240} python3 -m refusal crosslingual --model $MODEL --polyrefuse $PWD/.data/polyrefuse \
    --paper $D --output $RUNS --name crosslingual6 --config $C/crosslingual.yaml \
    --files zh:harmless=/tmp/harmless_zh.json --languages en,fr,es,de,ru,zh
  tar czf "$OUT/crosslingual6.tgz" -C $RUNS --exclude='*.safetensors' crosslingual6
  ;;
f)  # on a fresh machine: the paper run timed with the split prefill (issue 9), then where an 8B
    # decode step goes (random weights; no model files needed)
  if [ -z "${DRY:-}" ]; then
    step paper 150 python3 -m benchmarks.speed.paper_run --model "$MODEL" --data "$D" --out "$OUT/h200-run-5.json" \
      --runs $RUNS
    step profile8b 240 python3 -m benchmarks.speed.profile_generate --arch llama3-8b --batch 64 --out "$OUT/profile-8b.json"
  else
    rm -rf $RUNS/paper
    step paper 240 python3 -m refusal run $FLAGS --name paper --config $C/base.yaml
    step profile8b 120 python3 -m benchmarks.speed.profile_generate --arch tiny --batch 4 --new-tokens 8 \
      --out "$OUT/profile-8b.json"
  fi
  keep $RUNS/paper paper
  ;;
g)  # on a fresh machine: the paper run timed (issue 9), then the edit search in heretic's own protocol (11):
    # options ranked on the test prompts, as heretic does, the pick then scored on 128 held-out prompts of each kind
  paper_run h200-run-5.json
  keep $RUNS/paper paper
  step edit_search_test ${EDIT_SECONDS:-330} python3 -m benchmarks.quality.edit_search $RUNS/paper \
    --out "$OUT/edit_search-test.json" --objective test --val-pool $D --n-val 128 --sets 0,1,2,0+1,0+2 \
    --edits plain,norm_preserving,norm_preserving+orth_harmless --kernels flat,gauss_n/4 \
    --strengths 0.9,1.0,1.1,1.2 --keep 8 $SMALL ${DRY:+--sets 0,0+1 --n-val 10 --strengths 1.0}
  ;;
h)  # heretic 1.4.0 on this GPU (its H100 setup: 40 trials, batch 128), so that its wall time and refusal's
    # (part g) compare on one device; then the paper run twice on one machine (issue 9: machine vs code)
    # carry [".whl", ".data", ".whlh"]; .whlh holds heretic's wheels (benchmarks/peers/README.md)
  S=$D/splits
  if [ -z "${DRY:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-h \
      .whlh/*.whl
    step heretic ${HERETIC_SECONDS:-560} env PYTHONPATH=/tmp/site-h:$PYTHONPATH python3 benchmarks/peers/run_heretic.py \
      --model "$MODEL" --harmful-train $S/harmful_train.json --harmless-train $S/harmless_train.json \
      --harmful-test $D/processed/jailbreakbench.json --harmless-test $S/harmless_test.json --n-harmful-test 100 \
      --n-harmless-test 100 --trials 40 --batch-size 128 --time-budget 540 --out "$OUT/heretic-h200.json"
  else
    echo "heretic: skipped in a dry run (needs heretic's wheels)"
  fi
  ;;
i)  # the paper run (issue 9) on one fresh machine: twice with today's defaults (the first process after setup, then
    # a second), then with generate.static_cache: false (model.generate, the default before) for the same-machine
    # comparison
  printf 'generate:\n  static_cache: false\n' > $C/eager.yaml
  for n in ${PAPER_RUNS:-6 7 8}; do
    extra=""
    [ $n = 8 ] && extra="--config $C/eager.yaml"
    if [ -z "${DRY:-}" ]; then
      step paper$n 150 python3 -m benchmarks.speed.paper_run --model "$MODEL" --data "$D" --out "$OUT/h200-run-$n.json" \
        --runs $RUNS --extra="$extra"
    else
      rm -rf $RUNS/paper
      cfg=$C/base.yaml
      if [ -n "$extra" ]; then  # the small sizes of a dry run, and the eager setting
        sed 's/^generate:$/generate:\n  static_cache: false/' $C/base.yaml > $C/eager-dry.yaml
        cfg=$C/eager-dry.yaml
      fi
      step paper$n 240 python3 -m refusal run $FLAGS --name paper --config $cfg
    fi
    keep $RUNS/paper paper$n
  done
  ;;
*)
  echo "unknown part $PART (a to i)"; exit 2 ;;
esac
cat "$OUT/steps.txt" 2>/dev/null
if [ -z "${DRY:-}" ]; then  # the device returns a limited number of files: one archive
  (cd "$OUT" && tar czf /tmp/results.tgz . && find . -mindepth 1 -delete && mv /tmp/results.tgz .)
fi
