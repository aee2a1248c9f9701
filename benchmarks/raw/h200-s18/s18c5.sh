#!/usr/bin/env bash
# session 18 call 5 (nvidia-h200): Qwen3-0.6B calibrated over a KV pool the model wrote
# (calibrate.kv_cache_init=written, the new default; random ids, the clock fit), call 1's kernel
# plan pinned, then 6 real runs (3 traces x 0.6 / 0.9 x capacity, one repeat) on this machine, to
# price its steps with both calibrations (call 1's: KV of normal random values).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/o5; mkdir -p $O; nvidia-smi --query-gpu=name,clocks.sm,power.limit,serial --format=csv,noheader | tee $O/gpu.txt
cp simulator/calibrations/qwen3-0.6b-h200-tp1.json /tmp/kplan_q06.json
t0=$(date +%s)
timeout 230 python3 run.py experiment=calibrate model=qwen3-0.6b hardware=h200 engine.kernel_plan=/tmp/kplan_q06.json \
  calibrate.out=$O/cal/qwen3-0.6b-h200-tp1.json > $O/calibrate_q06.txt 2>&1; echo "calibrate rc=$? $(( $(date +%s) - t0 )) s"
grep "KV pool\|^decode  \|^mixed  " $O/calibrate_q06.txt | cut -c1-160
mkdir -p $O/fid && cp build/capacity_q06.json $O/fid/capacity.json
left=$(( 300 - ($(date +%s) - t0) ))
timeout $left python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b --hardware h200 \
   --calibration /tmp/kplan_q06.json --out $O/fid --traces sharegpt,azure_conv,mooncake_conv --num-requests 100 \
   --repeats 1 --loads 0.6,0.9 --pairs "" --stages real > $O/fid_real.txt 2>&1; echo "fid rc=$? $(( $(date +%s) - t0 )) s"
find $O/fid/real -name summary.json | wc -l
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c5.tar.xz; split -b 2800k /tmp/c5.tar.xz $OUT/part_; ls $OUT
