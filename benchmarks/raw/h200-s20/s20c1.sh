#!/usr/bin/env bash
# Session 20 call 1 (nvidia-h200-x2, both GPUs): tensor parallelism checked on this engine
# (check_tp --tp 2: all-reduce, TP=2 vs TP=1 greedy tokens, injected worker faults), then
# Llama-3.1-8B at TP=2 calibrated on the current grid (padded decode batches, the written KV
# pool, random token ids: the default), its kernel plan timed at start and recorded in the file.
# The file lands in /tmp/cal (later calls on this machine) and $OUT.
set -u
export PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c1; mkdir -p $O /tmp/cal
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.limit,temperature.gpu,serial --format=csv,noheader | tee $O/gpu.txt
t0=$(date +%s)
timeout ${TP_T:-200} python3 benchmarks/check_tp.py --tp 2 > $O/check_tp.txt 2>&1; echo "check_tp rc=$? $(( $(date +%s) - t0 )) s"
grep -v -i "warn\|loading" $O/check_tp.txt | tail -20 | cut -c1-300
timeout ${CAL_T:-560} python3 run.py experiment=calibrate model=llama-3.1-8b hardware=h200 engine.tensor_parallel_size=2 \
    calibrate.out=/tmp/cal/llama-3.1-8b-h200-tp2.json > $O/calibrate_l8_tp2.txt 2>&1
echo "calibrate rc=$? $(( $(date +%s) - t0 )) s"
grep -v "^{" $O/calibrate_l8_tp2.txt | grep -v -i "warn\|loading\|random weights\|^profiled" | grep -v "^decode  \|^mixed  " | tail -24 | cut -c1-400
cp /tmp/cal/* $O/ 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader | tee -a $O/gpu.txt
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c1.tar.xz; split -b 2800k /tmp/c1.tar.xz $OUT/part_; ls -la $OUT
