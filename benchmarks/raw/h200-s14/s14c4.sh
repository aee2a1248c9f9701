#!/usr/bin/env bash
# session 14 call 4 (the same nvidia-h200, warm after call 3): Llama-3.1-8B cells on the machine its
# call-3 calibration was made on, until the time limit: azure_conv and sharegpt at 0.6 x capacity
# (session 12's capacity.json), 3 repeats
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/o4; mkdir -p $O/fid_l8; cp build/capacity_l8.json $O/fid_l8/capacity.json
cp /tmp/o3/llama-3.1-8b-h200-tp1.json simulator/calibrations/llama-3.1-8b-h200-tp1.json
timeout ${T:-230} python3 benchmarks/fidelity/run_fidelity.py --model llama-3.1-8b --hardware h200 \
    --calibration simulator/calibrations/llama-3.1-8b-h200-tp1.json --out $O/fid_l8 \
    --traces azure_conv,sharegpt --num-requests 100 --repeats 3 --loads 0.6 --pairs "" --stages real > $O/fid_l8.txt 2>&1; echo "rc=$?"
find $O/fid_l8/real -name summary.json | sort
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c4.tar.xz; split -b 2800k /tmp/c4.tar.xz $OUT/part_; ls -la $OUT
