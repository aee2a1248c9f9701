#!/usr/bin/env bash
# Session 23 call 3 (nvidia-h200): why the one-launch layer ran slower than five launches in
# call 2 (1.583 against 1.135 ms a batch-1 step): its GEMM loops compile unpipelined (22 KB of
# shared memory), so one program per SM keeps few bytes in flight. The GPU tests again (the
# grid now sized by programs per SM, capped by what fits), then per-layer times of every
# variant: programs per SM 1 / 2 / 4 x L2 prefetch distance, without prefetch, and as five
# launches of its stages, against the engine's five-launch path (bench_decode_layer.py).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
t0=$(date +%s)
TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q -x -p no:randomly tests/test_decode_layer.py > $OUT/tests.txt 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 )) s"; tail -2 $OUT/tests.txt
timeout 380 python3 benchmarks/bench_decode_layer.py --model qwen3-0.6b --rows 1,16,64 \
  --kernel-plan simulator/calibrations/qwen3-0.6b-h200-tp1.json > $OUT/bench_decode_layer.txt 2>&1
echo "bench rc=$? $(( $(date +%s) - t0 )) s"; grep -v "^{" $OUT/bench_decode_layer.txt | tail -52
