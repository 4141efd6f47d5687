# Sourced by the GPU scripts: step NAME SECONDS COMMAND... runs COMMAND with a time limit, logs it to $OUT/NAME.log
# and records its exit status and seconds in $OUT/steps.txt (a step that fails or runs out of time does not stop the
# next).
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record rc and seconds
  local name=$1 lim=$2 t0 rc
  shift 2
  t0=$(date +%s.%N)
  timeout "$lim" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/$name.log"
}
