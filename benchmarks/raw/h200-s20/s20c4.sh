#!/usr/bin/env bash
# Session 20 (the same nvidia-h200, warm after s20c3.sh): Llama-3.1-8B's 12 table cells x 3
# repeats (sessions 12-17's capacity.json and loads, 100 requests) pinned to the call-3 file's
# kernel plan; resumes where the last call stopped.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c4; mkdir -p $O/fid_l8; cp build/capacity_l8.json $O/fid_l8/capacity.json
t0=$(date +%s)
timeout ${T:-570} python3 benchmarks/fidelity/run_fidelity.py --model llama-3.1-8b --hardware h200 \
    --calibration /tmp/cal/llama-3.1-8b-h200-tp1.json --out $O/fid_l8 \
    --traces azure_conv,sharegpt,mooncake_conv --num-requests 100 --repeats 3 --loads 0.3,0.6,0.9,1.2 --pairs "" --stages real >> $O/fid_l8.txt 2>&1
echo "fidelity rc=$? $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=serial,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
find $O/fid_l8/real -name summary.json | sort | tee $O/done.txt | wc -l
rm -f $OUT/part_*; cd $O && tar -cf - . | xz -T16 -6 > /tmp/c4.tar.xz; split -b 2800k /tmp/c4.tar.xz $OUT/part_; ls -la $OUT
