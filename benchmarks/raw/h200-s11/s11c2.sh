#!/usr/bin/env bash
# Session 11, call 2 (nvidia-h200 alone): Llama-3.1-8B re-profiled on the 1,881-shape grid (the
# shipped kernel plan pinned, so the table's runs and the profile run the same kernels), then the
# third repeat of its fidelity cells until the time limit (r0/r1 summaries and capacity.json travel
# in build/skel, so only r2 runs, at the table's loads).
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
cp simulator/calibrations/llama-3.1-8b-h200-tp1.json /tmp/kplan_l8.json
cp -r build/skel/fid_llama-3.1-8b $O/
KPLAN=/tmp/kplan_l8.json CAL_T=470 OUT=$O STAGES="calibrate_l8" bash benchmarks/h200_session.sh 2>&1 | grep -v "^profiled" | grep -v "^decode  \|^mixed  " | tail -5 | cut -c1-600; t calibrate_l8
export PYTHONPATH=/tmp/site:$PWD
left=$((560 - (SECONDS-S)))
timeout $left python3 benchmarks/fidelity/run_fidelity.py --model llama-3.1-8b --hardware h200 \
  --calibration /tmp/kplan_l8.json --out $O/fid_llama-3.1-8b --traces mooncake_conv,azure_conv,sharegpt \
  --num-requests 100 --repeats 3 --loads 0.3,0.6,0.9,1.2 --pairs "" \
  --stages real > $O/fid_real_l8.txt 2>&1; echo rc=$?; grep -v "kept 100 of" $O/fid_real_l8.txt | tail -3; t fid_real
echo "r2 runs: $(find $O/fid_llama-3.1-8b -path '*r2/summary.json' | wc -l)"
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
