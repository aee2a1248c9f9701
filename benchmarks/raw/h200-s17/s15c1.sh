#!/usr/bin/env bash
# session 15 call 1 (nvidia-h200): Llama-3.1-8B calibrated with the launch timeline and the hot
# timings, the shipped kernel plan pinned
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/o1; mkdir -p $O; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.limit,temperature.gpu,serial --format=csv,noheader | tee $O/gpu.txt
cp simulator/calibrations/llama-3.1-8b-h200-tp1.json /tmp/kplan_l8.json
t0=$(date +%s)
timeout ${CAL_T:-585} python3 run.py experiment=calibrate model=llama-3.1-8b hardware=h200 engine.kernel_plan=/tmp/kplan_l8.json > $O/calibrate_l8.txt 2>&1; echo "calibrate rc=$? $(( $(date +%s) - t0 )) s"
grep -v "^{" $O/calibrate_l8.txt | grep -v -i "warn\|loading\|random weights" | grep -v "^decode  \|^mixed  " | tail -16 | cut -c1-400
mkdir -p /tmp/cal && cp simulator/calibrations/llama-3.1-8b-h200-tp1.* /tmp/cal/ && cp simulator/calibrations/llama-3.1-8b-h200-tp1.* $O/ 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader | tee -a $O/gpu.txt
ls -la $O
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c1.tar.xz; split -b 2800k /tmp/c1.tar.xz $OUT/part_; ls -la $OUT
