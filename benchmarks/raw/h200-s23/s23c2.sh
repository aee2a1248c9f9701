#!/usr/bin/env bash
# Session 23 call 2 (nvidia-h200): the one-launch decoder layer (engine.kernels.decode_layer).
# 1. compiled GPU tests: the persistent kernel with its barriers against the torch layer, and the
#    refactored decode / skinny kernels (their programs now functions of the work item);
# 2. Qwen3-0.6B step table, decode B = 1 / 16 / 64 and 64 + 16 mixed, five launches a layer vs
#    one (--decode-layer-max-rows 0 / 64), the kernel plan pinned to the shipped calibration's;
# 3. a batch-1 decode step's kernels in launch order with one launch a layer.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
KP=simulator/calibrations/qwen3-0.6b-h200-tp1.json
t0=$(date +%s)
TRITON_INTERPRET=0 timeout 240 python3 -m pytest -q -x -p no:randomly tests/test_decode_layer.py \
  tests/test_decode_fold.py tests/test_skinny_gemm.py > $OUT/tests.txt 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 )) s"; tail -3 $OUT/tests.txt
python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
for r in 0 64; do
  timeout 200 python3 benchmarks/bench_serving.py --tables steps --model /tmp/q06 --decode-batches 1,16,64 \
    --mixed-batches 64 --chunks 16 --kernel-plan $KP --decode-layer-max-rows $r > $OUT/steps_r$r.txt 2>&1
  echo "steps r=$r rc=$? $(( $(date +%s) - t0 )) s"; grep -A8 "^step cost" $OUT/steps_r$r.txt | cut -c1-130
done
timeout 130 python3 benchmarks/profile_decode.py --model /tmp/q06 --top 20 --timeline 30 --batch 1 \
  --decode-layer-max-rows 64 > $OUT/profile_b1_r64.txt 2>&1
echo "prof rc=$? $(( $(date +%s) - t0 )) s"; head -16 $OUT/profile_b1_r64.txt | cut -c1-120
