#!/usr/bin/env bash
# Session 12, call 3b (the same nvidia-h200, warm after s12c3.sh, whose run folders stay in /tmp/o):
# mooncake_conv's remaining cells, L3's repeats 2-3 first (placeholders hold back L0), then L0.
# As run (one command line), re-wrapped here.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TWINSERVE_COMMIT=$(cat build/commit); F=/tmp/o/fid_llama-3.1-8b
S=$SECONDS
for r in 0 1 2; do mkdir -p $F/real/mooncake_conv-L0/r$r; echo '{"placeholder": true}' > $F/real/mooncake_conv-L0/r$r/summary.json; done
fid() { timeout $1 python3 benchmarks/fidelity/run_fidelity.py --model llama-3.1-8b --hardware h200 \
  --calibration simulator/calibrations/llama-3.1-8b-h200-tp1.json --out $F --traces mooncake_conv \
  --num-requests 100 --repeats 3 --loads 0.3,0.6,0.9,1.2 --pairs "" --stages real >> /tmp/o/fid_real_l8_p3.txt 2>&1; echo rc=$?; }
fid 110; rm -rf $F/real/mooncake_conv-L0; fid $((245 - (SECONDS-S)))
find $F/real -name summary.json | sort | tr '\n' ' '
cd /tmp/o && tar -cf - fid_real_l8_p3.txt fid_llama-3.1-8b/real/mooncake_conv-L3 fid_llama-3.1-8b/real/mooncake_conv-L0 | xz -T16 > $OUT/p3.tar.xz
