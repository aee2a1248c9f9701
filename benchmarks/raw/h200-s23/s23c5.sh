#!/usr/bin/env bash
# Session 23 call 5 (nvidia-h200): what a step costs after the device sat idle (0.5-500 ms),
# on 6 profiled shapes of each step kind against the fitted model's price and clock term over
# the same history (python -m experiments.calibrate --idle-cost), Qwen3-0.6B then Llama-3.1-8B,
# into copies of the shipped calibrations.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
END=$((SECONDS + ${BUDGET:-500}))
for m in qwen3-0.6b llama-3.1-8b; do
  left=$((END - SECONDS)); [ $left -lt 90 ] && { echo "$m skipped (${left}s left)"; continue; }
  mkdir -p $OUT/$m; for ext in json profile.parquet; do cp simulator/calibrations/$m-h200-tp1.$ext $OUT/$m/; done
  timeout $left python3 -m experiments.calibrate --idle-cost model=$m hardware=h200 calibrate.repeats=3 \
    calibrate.out=$OUT/$m/$m-h200-tp1.json > $OUT/$m/idle_cost.txt 2>&1
  echo "$m rc=$? at ${SECONDS}s"; rm -f $OUT/$m/*.profile.parquet; grep -A14 "^the step after idle" $OUT/$m/idle_cost.txt | cut -c1-160
done
