#!/usr/bin/env bash
# session 19 call 5 (a fresh nvidia-h200, ~300 s): where issue 9's missed targets spend the
# device time at this commit: kernels of the 64-decode steps alone, + 16 and + 2,048 prompt
# tokens (bench_serving --profile), and of one batch-1 decode step in launch order.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
KP=simulator/calibrations/qwen3-0.6b-h200-tp1.json
python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
t0=$(date +%s)
timeout 170 python3 benchmarks/bench_serving.py --tables steps --model /tmp/q06 --decode-batches 64 --mixed-batches 64 \
  --chunks 16,2048 --steps 6 --profile 64:0,64:16,64:2048 --kernel-plan $KP > $OUT/profile_steps_q06.txt 2>&1
echo "profsteps rc=$? $(( $(date +%s) - t0 )) s"
timeout 130 python3 benchmarks/profile_decode.py --model /tmp/q06 --top 30 --timeline 40 --batch 1 > $OUT/profile_q06_b1.txt 2>&1
echo "prof b1 rc=$? $(( $(date +%s) - t0 )) s"
grep -A16 "^profile:" $OUT/profile_steps_q06.txt | cut -c1-110 | head -60; head -40 $OUT/profile_q06_b1.txt | cut -c1-120
