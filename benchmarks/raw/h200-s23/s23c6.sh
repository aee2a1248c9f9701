#!/usr/bin/env bash
# Session 23 call 6 (nvidia-h200, the session's last minutes): the decode attention's shortest
# share (policy.decode_plan.MIN_TOKENS_PER_SPLIT, 128) at batch 1: 8 KV heads x 8 shares of 128
# tokens (64 programs on 132 SMs) for a 1k context. Qwen3-0.6B step table with the engine's
# plan re-cut at 128 / 64 / 32 tokens (patched in-process, kernel plan pinned).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
t0=$(date +%s)
for v in ${VALUES:-128 32 64}; do
  timeout 100 python3 - > $OUT/steps_min$v.$SECONDS.txt 2>&1 <<PY
import sys, runpy
sys.path.insert(0, "benchmarks")
import policy.decode_plan as d
import engine.kernels.launch as launch
launch.decode_shares = lambda c, h, s: d.DecodePlan(h, s, min_tokens_per_split=$v).shares(c)
sys.argv = ["bench_serving.py", "--tables", "steps", "--model", "/tmp/q06", "--decode-batches", "1,16,64",
            "--mixed-batches", "64", "--chunks", "16", "--kernel-plan", "simulator/calibrations/qwen3-0.6b-h200-tp1.json"]
runpy.run_path("benchmarks/bench_serving.py", run_name="__main__")
PY
  echo "min=$v rc=$? $(( $(date +%s) - t0 )) s"; grep -A5 "^decodes" $(ls -t $OUT/steps_min$v.* | head -1) | cut -c1-72
done
