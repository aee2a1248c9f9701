#!/usr/bin/env bash
# Session 22 call 5 (nvidia-h200, the session's last ~5 min): the block-64 cost on 48 profiled
# shapes per step kind (calls 1-2 timed 16), Qwen3-0.6B then Llama-3.1-8B as time allows, into
# copies: does a model's block-64 gain depend on the decode batch (graph rows)? Each model's
# outputs land in $OUT as they finish (a timeout keeps what finished).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
END=$((SECONDS + ${BUDGET:-300}))
for m in qwen3-0.6b llama-3.1-8b; do
  left=$((END - SECONDS)); [ $left -lt 60 ] && { echo "$m skipped (${left}s left)"; continue; }
  mkdir -p $OUT/$m; for ext in json profile.parquet; do cp simulator/calibrations/$m-h200-tp1.$ext $OUT/$m/; done
  timeout $left python3 -c "
import functools, sys
import experiments.block_cost as bc
bc.choose_shapes = functools.partial(bc.choose_shapes, per_kind=48)
from experiments.calibrate import main
main(['--block-cost', '64', 'model=$m', 'hardware=h200', 'calibrate.out=$OUT/$m/$m-h200-tp1.json'])
" > $OUT/$m/block_cost.txt 2>&1
  echo "$m rc=$? at ${SECONDS}s"; rm -f $OUT/$m/*.profile.parquet; tail -6 $OUT/$m/block_cost.txt | cut -c1-200
done
