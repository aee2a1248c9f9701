#!/usr/bin/env bash
# Session 21 call 3 (nvidia-h200, ~400 s): do the twin's policy-pair misses shrink with more
# requests per run? Qwen3-0.6B, sharegpt and azure_conv, pairs policy and budget at 0.9 x
# capacity (session 14's capacity.json), 400 requests (session 19's pairs: 100), 3 repeats,
# the shipped calibration's kernel plan pinned. Resumes (T: its limit).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c3; mkdir -p $O/pairs400_q06; cp build/capacity_q06.json $O/pairs400_q06/capacity.json
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $O/gpu.txt
t0=$(date +%s)
timeout ${T:-520} python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b --hardware h200 \
    --calibration simulator/calibrations/qwen3-0.6b-h200-tp1.json --out $O/pairs400_q06 \
    --traces sharegpt,azure_conv --num-requests 400 --repeats 3 --loads 0.9 \
    --pairs policy,budget --stages real >> $O/pairs400_q06.txt 2>&1
echo "pairs rc=$? $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=serial,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
find $O/pairs400_q06/real -name summary.json | sort | tee $O/done.txt | wc -l
rm -f $OUT/part_*; cd $O && tar -cf - . | xz -T16 -6 > /tmp/c3.tar.xz; split -b 2800k /tmp/c3.tar.xz $OUT/part_; ls -la $OUT
