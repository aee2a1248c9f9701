#!/usr/bin/env bash
# session 18 call 1 (nvidia-h200): Qwen3-0.6B calibrated as serving's data has it (random token
# ids, a KV pool of random values: calibrate.token_ids / calibrate.kv_cache_init defaults, the clock
# term on the launch timeline), the shipped kernel plan pinned; then the 36 real runs of its
# fidelity table (session 14's loads, build/capacity_q06.json = fidelity/results/qwen3-0.6b-h200-s14/
# capacity.json) on this machine. Run from the repository root with .whl/ and build/ carried.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/o; mkdir -p $O; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.limit,serial --format=csv,noheader | tee $O/gpu.txt
cp simulator/calibrations/qwen3-0.6b-h200-tp1.json /tmp/kplan_q06.json
t0=$(date +%s)
timeout 260 python3 run.py experiment=calibrate model=qwen3-0.6b hardware=h200 engine.kernel_plan=/tmp/kplan_q06.json > $O/calibrate_q06.txt 2>&1; echo "calibrate rc=$? $(( $(date +%s) - t0 )) s"
grep -v "^{" $O/calibrate_q06.txt | grep -v -i "warn\|loading" | grep -v "^decode  \|^mixed  " | tail -14 | cut -c1-400
tar czf $O/calibrations_q06.tgz simulator/calibrations/qwen3-0.6b-h200-tp1.*
mkdir -p $O/fid_q06 && cp build/capacity_q06.json $O/fid_q06/capacity.json
left=$(( 575 - ($(date +%s) - t0) ))
timeout $left python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b --hardware h200 \
   --calibration simulator/calibrations/qwen3-0.6b-h200-tp1.json --out $O/fid_q06 \
   --traces sharegpt,azure_conv,mooncake_conv --num-requests 100 --repeats 3 --loads 0.3,0.6,0.9,1.2 --pairs "" \
   --stages real > $O/fid_real_q06.txt 2>&1; echo "fid rc=$? $(( $(date +%s) - t0 )) s"
tail -3 $O/fid_real_q06.txt | cut -c1-300; find $O/fid_q06/real -name summary.json | wc -l
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; ls -la $OUT
