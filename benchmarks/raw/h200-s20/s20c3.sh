#!/usr/bin/env bash
# Session 20 (nvidia-h200): Llama-3.1-8B (TP=1) calibrated on the current grid (padded decode
# batches across every graph bucket, the written KV pool, random token ids: the default), the
# shipped kernel plan pinned; calibrate.repeats=2 (the 3-repeat profile, ~586 s, would not fit
# a 600 s call). The file lands in /tmp/cal (later calls on this machine) and $OUT.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c3; mkdir -p $O /tmp/cal
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.limit,temperature.gpu,serial --format=csv,noheader | tee $O/gpu.txt
cp simulator/calibrations/llama-3.1-8b-h200-tp1.json /tmp/kplan_l8.json
t0=$(date +%s)
timeout ${CAL_T:-560} python3 run.py experiment=calibrate model=llama-3.1-8b hardware=h200 engine.kernel_plan=/tmp/kplan_l8.json \
    calibrate.repeats=${REPEATS:-2} calibrate.out=/tmp/cal/llama-3.1-8b-h200-tp1.json > $O/calibrate_l8.txt 2>&1
echo "calibrate rc=$? $(( $(date +%s) - t0 )) s"
grep -v "^{" $O/calibrate_l8.txt | grep -v -i "warn\|loading\|random weights\|^profiled" | grep -v "^decode  \|^mixed  " | tail -20 | cut -c1-400
cp /tmp/cal/* $O/ 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader | tee -a $O/gpu.txt
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c3.tar.xz; split -b 2800k /tmp/c3.tar.xz $OUT/part_; ls -la $OUT
