#!/usr/bin/env bash
# Session 24 call 3 (nvidia-h200): Qwen3-0.6B's policy pairs at 0.9 x capacity (session 14's
# capacity.json), 3 traces x 4 pairs x 3 repeats, 100 requests, call 1's calibration pinned
# (the engine's new split rule); then issue 9's whole step-cost table (bench_serving.py
# --tables steps, the same file pinned). Resumes (T: its limit).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c3; mkdir -p $O/pairs; cp build/capacity_q06.json $O/pairs/capacity.json
nvidia-smi --query-gpu=name,serial,clocks.sm,temperature.gpu --format=csv,noheader | tee $O/gpu.txt
CAL=$PWD/build/q06new/qwen3-0.6b-h200-tp1.json
t0=$(date +%s)
timeout ${T:-400} python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b --hardware h200 \
    --calibration $CAL --out $O/pairs --traces azure_conv,sharegpt,mooncake_conv --num-requests 100 --repeats 3 \
    --loads 0.9 --pairs policy,budget,block_size,prefix_caching --stages real >> $O/pairs.txt 2>&1
echo "pairs rc=$? $(( $(date +%s) - t0 )) s"; find $O/pairs/real -name summary.json | wc -l
python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
left=$(( ${TOTAL:-545} - ($(date +%s) - t0) ))
[ $left -gt 40 ] && timeout $left python3 benchmarks/bench_serving.py --tables steps --model /tmp/q06 --kernel-plan $CAL > $O/steps_full.txt 2>&1
echo "steps rc=$? $(( $(date +%s) - t0 )) s"; grep -A24 "^decodes" $O/steps_full.txt | cut -c1-120
nvidia-smi --query-gpu=clocks.sm,temperature.gpu --format=csv,noheader | tee -a $O/gpu.txt
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c3.tar.xz; split -b 15m /tmp/c3.tar.xz $OUT/part_; ls -la $OUT
