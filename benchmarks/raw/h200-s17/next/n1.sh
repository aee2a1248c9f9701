#!/usr/bin/env bash
# For the next device session, call 1 (nvidia-h200, ~250 s with a cold start): issue 9's overlap
# stage, which hit a device-side assert in session 17 (raw/h200-s17/c1/overlap.txt: a torch
# index kernel, elements ~480k-502k, before the first CUDA-graph timing). First as the stage runs
# it (measure_graph now waits for the eager run before timing); if it fails again, once more
# with CUDA_LAUNCH_BLOCKING=1, which names the failing op (its timings then mean nothing).
# Then the small step-cost table of Qwen3-0.6B at this commit (issue 9's 64 + 16 figure).
# Run from the repository root with .whl/ and build/ carried (build/commit: git rev-parse --short HEAD).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
nvidia-smi --query-gpu=name,clocks.sm,power.limit,serial --format=csv,noheader | tee $OUT/gpu.txt
timeout 150 python3 benchmarks/bench_attention.py --stages overlap --no-flashinfer > $OUT/overlap.txt 2>&1; rc=$?
echo "overlap rc=$rc"; grep -v IndexKernel $OUT/overlap.txt | tail -10 | cut -c1-250
if [ $rc -ne 0 ]; then
  CUDA_LAUNCH_BLOCKING=1 timeout 150 python3 benchmarks/bench_attention.py --stages overlap --no-flashinfer > $OUT/overlap_blocking.txt 2>&1
  echo "overlap (launch blocking) rc=$?"; grep -v IndexKernel $OUT/overlap_blocking.txt | grep -B2 -A12 Traceback | head -30 | cut -c1-250
fi
STAGES="steps_small" OUT=$OUT bash benchmarks/h200_session.sh
