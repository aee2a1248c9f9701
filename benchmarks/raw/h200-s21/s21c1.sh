#!/usr/bin/env bash
# Session 21 (nvidia-h200): Llama-3.1-8B's policy pairs at 0.9 x capacity (issue 10's
# policy-effect target; last run in session 11), both sides of every pair on this machine:
# 3 traces x (base, prefill_first, budget 2048, block 16 / 64 under memory pressure; prefix
# caching off on mooncake_conv) x 3 repeats, 100 requests, session 20's capacity.json, the
# shipped calibration's kernel plan pinned. Resumes where the last call stopped (T: its limit).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c1; mkdir -p $O/pairs_l8; cp build/capacity_l8.json $O/pairs_l8/capacity.json
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $O/gpu.txt
t0=$(date +%s)
timeout ${T:-560} python3 benchmarks/fidelity/run_fidelity.py --model llama-3.1-8b --hardware h200 \
    --calibration simulator/calibrations/llama-3.1-8b-h200-tp1.json --out $O/pairs_l8 \
    --traces azure_conv,sharegpt,mooncake_conv --num-requests 100 --repeats 3 --loads 0.9 \
    --pairs policy,budget,block_size,prefix_caching --stages real >> $O/pairs_l8.txt 2>&1
echo "pairs rc=$? $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=serial,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
find $O/pairs_l8/real -name summary.json | sort | tee $O/done.txt | wc -l
rm -f $OUT/part_*; cd $O && tar -cf - . | xz -T16 -6 > /tmp/c1.tar.xz; split -b 2800k /tmp/c1.tar.xz $OUT/part_; ls -la $OUT
