#!/usr/bin/env bash
# On the lent GPU (after the GGUF parts are in /tmp/m): the paper's setup on Qwen2.5-Coder-1.5B-Instruct, then
# heretic's two metrics on our ablated model (orthogonalized weights), for the side-by-side with heretic.
. benchmarks/gpu_setup.sh
D=.data/refusal_direction
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s.%N)
python3 -m refusal run --model /tmp/m/hf --name qwen2.5-coder-1.5b --output /tmp/runs --preset paper \
  --harmful $D --harmless $D --harmful-test $D/processed/jailbreakbench.json
t1=$(date +%s.%N)
echo "refusal run wall_s $(python3 -c "print(round($t1 - $t0, 1))")" | tee $OUT/refusal_wall.txt
R=/tmp/runs/qwen2.5-coder-1.5b
mkdir -p $OUT/qwen && cp $R/summary.json $R/scores.json $R/scores.png $R/completions.json $R/config.yaml $OUT/qwen/
python3 - <<'PY'
import time, torch
from refusal import load_model, orthogonalize_
from refusal.directions.diff_means import Direction
from refusal.models.loading import save_plain
t = time.time()
m, tok = load_model("/tmp/m/hf", device="cuda")
orthogonalize_(m, Direction.load("/tmp/runs/qwen2.5-coder-1.5b/direction.safetensors").vector)
save_plain(m, tok, "/tmp/m/ours")
print(f"export orthogonalized model: {time.time() - t:.1f} s")
PY
python3 benchmarks/peers/heretic_metric.py --base /tmp/m/hf --model /tmp/m/ours \
  --harmless $D/splits/harmless_test.json --harmful $D/processed/jailbreakbench.json --out $OUT/ours_heretic_metric.json
