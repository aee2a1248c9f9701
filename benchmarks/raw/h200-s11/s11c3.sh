#!/usr/bin/env bash
# Session 11, call 3 (nvidia-h200-x2): Llama-3.1-8B at TP=2 re-profiled on the current engine and
# the 1,881-shape grid (both GPUs), then, on GPU 0 alone, more of Llama's third fidelity repeat
# (call 2 ran five cells) until the time limit.
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
cp simulator/calibrations/llama-3.1-8b-h200-tp1.json /tmp/kplan_l8.json
cp -r build/skel/fid_llama-3.1-8b $O/
CAL_T=390 OUT=$O STAGES="calibrate_l8_tp2" bash benchmarks/h200_session.sh 2>&1 | grep -v "^profiled" | grep -v "^decode  \|^mixed  " | tail -5 | cut -c1-600; t calibrate_l8_tp2
export PYTHONPATH=/tmp/site:$PWD
left=$((525 - (SECONDS-S)))
CUDA_VISIBLE_DEVICES=0 timeout $left python3 benchmarks/fidelity/run_fidelity.py --model llama-3.1-8b --hardware h200 \
  --calibration /tmp/kplan_l8.json --out $O/fid_llama-3.1-8b --traces azure_conv,sharegpt \
  --num-requests 100 --repeats 3 --loads 0.3,0.6,0.9,1.2 --pairs "" \
  --stages real > $O/fid_real_l8.txt 2>&1; echo rc=$?; t fid_real
echo "r2 runs: $(find $O/fid_llama-3.1-8b -path '*r2/summary.json' | wc -l)"
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
