#!/usr/bin/env bash
# Session 23 call 1 (nvidia-h200): the block-64 cost with the profiled shapes' KV scattered over
# the pool as serving leaves it (calibrate.block_cost_layout=scattered; session 22 timed them
# contiguous), 48 shapes a kind, Qwen3-0.6B then Llama-3.1-8B, into copies of the shipped files.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
END=$((SECONDS + ${BUDGET:-420}))
for m in qwen3-0.6b llama-3.1-8b; do
  left=$((END - SECONDS)); [ $left -lt 60 ] && { echo "$m skipped (${left}s left)"; continue; }
  mkdir -p $OUT/$m; for ext in json profile.parquet; do cp simulator/calibrations/$m-h200-tp1.$ext $OUT/$m/; done
  timeout $left python3 -m experiments.calibrate --block-cost 64 model=$m hardware=h200 \
    calibrate.block_cost_layout=scattered calibrate.out=$OUT/$m/$m-h200-tp1.json > $OUT/$m/block_cost.txt 2>&1
  echo "$m rc=$? at ${SECONDS}s"; rm -f $OUT/$m/*.profile.parquet; tail -6 $OUT/$m/block_cost.txt | cut -c1-200
done
