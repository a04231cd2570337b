#!/bin/bash
# One device call after code changes (2.1 stack, 2 GPUs): routers, validation, switch, bench bf16 (with
# --profile) and fp8, both with --out, each under timeout within BUDGET seconds (default 500); everything lands in $OUT/fin.tgz.
# Usage (after `source .gpu/bin/install.sh`): BUDGET=480 bash scripts/gpu-session-checks.sh
export PYTHONPATH=$PWD EP_DISABLE_GIN=1
R=$OUT; export OUT=/tmp/fin; mkdir -p $OUT
T0=$(date +%s); BUDGET=${BUDGET:-500}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
run() { local name=$1 cap=$2 min=$3; shift 3; local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt "$min" ]; then echo "== $name SKIPPED ($t s left)"; return; fi
  echo "== $(date -u +%H:%M:%S) $name (timeout $t)"; timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1; echo "== $name rc $?"
  grep -E "^=+ .*(passed|failed|error).*=+$|XPASS|FAILED|Error" "$OUT/$name.log" | tail -6; }
run routers 130 60 bash scripts/gpu-validate.sh routers
run validation 110 60 bash scripts/gpu-validate.sh validation
run switch 90 50 bash scripts/gpu-validate.sh switch
mkdir -p $OUT/bf16 $OUT/fp8
run bench-bf16 150 60 python3 -m deepep_switch.cli bench --ranks 2 --timeout 140 --out $OUT/bf16 --profile $OUT/bf16/profile.txt --json $OUT/bench-bf16.json
grep -v "^bench \[" $OUT/bench-bf16.log | sed -n '/^backend/,/^wrote/p' | head -40
run bench-fp8 120 60 python3 -m deepep_switch.cli bench --ranks 2 --timeout 110 --fp8 --out $OUT/fp8 --json $OUT/bench-fp8.json
grep -v "^bench \[" $OUT/bench-fp8.log | sed -n '/^backend/,/^wrote/p' | head -30
echo "== done after $(( $(date +%s) - T0 )) s"
tar -czf $R/fin.tgz -C /tmp fin
