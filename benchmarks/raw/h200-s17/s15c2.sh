#!/usr/bin/env bash
# session 15 calls 2-3 (the same nvidia-h200, warm): Llama-3.1-8B's fidelity table runs (session 12's
# loads), 3 repeats, with the call-1 calibration's kernel plan; resumes where the last call stopped
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/o2; mkdir -p $O/fid_l8; cp build/capacity_l8.json $O/fid_l8/capacity.json
[ -f /tmp/cal/llama-3.1-8b-h200-tp1.json ] && cp /tmp/cal/llama-3.1-8b-h200-tp1.json simulator/calibrations/llama-3.1-8b-h200-tp1.json
timeout ${T:-575} python3 benchmarks/fidelity/run_fidelity.py --model llama-3.1-8b --hardware h200 \
    --calibration simulator/calibrations/llama-3.1-8b-h200-tp1.json --out $O/fid_l8 \
    --traces azure_conv,sharegpt,mooncake_conv --num-requests 100 --repeats 3 --loads 0.3,0.6,0.9,1.2 --pairs "" --stages real >> $O/fid_l8.txt 2>&1; echo "rc=$?"
nvidia-smi --query-gpu=serial,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
find $O/fid_l8/real -name summary.json | sort | tee $O/done.txt | wc -l
rm -f $OUT/part_*; cd $O && tar -cf - . | xz -T16 -6 > /tmp/c2.tar.xz; split -b 2800k /tmp/c2.tar.xz $OUT/part_; ls -la $OUT
