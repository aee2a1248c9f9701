#!/usr/bin/env bash
# session 19 call 3 (the same warm nvidia-h200 as call 2, ~360 s): Qwen3-0.6B's 36 table runs
# (session 14's capacity.json as build/capacity_q06.json; the shipped kernel plan pinned by
# run_fidelity), STREAMS=true with engine.attention_streams on. On the CPU: run_fidelity.py
# --stages sim,table with each of call 2's files, step_residuals.py on both.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c3; mkdir -p $O/fid; nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $O/gpu.txt
cp build/capacity_q06.json $O/fid/capacity.json
t0=$(date +%s)
timeout 560 python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b --hardware h200 \
   --calibration simulator/calibrations/qwen3-0.6b-h200-tp1.json --out $O/fid \
   --traces sharegpt,azure_conv,mooncake_conv --num-requests 100 --repeats 3 --loads 0.3,0.6,0.9,1.2 --pairs "" \
   --stages real --set engine.attention_streams=${STREAMS:-false} > $O/fid_real.txt 2>&1
echo "fid rc=$? $(( $(date +%s) - t0 )) s"; find $O/fid/real -name summary.json | wc -l
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c3.tar.xz; split -b 2800k /tmp/c3.tar.xz $OUT/part_; ls $OUT
