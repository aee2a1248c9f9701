#!/usr/bin/env bash
# Session 12, call 2 (nvidia-h200 alone): does a step cost more after a step of the other kind
# than after itself (the profile times each shape after itself)? Llama-3.1-8B and Qwen3-0.6B,
# decode batches 8/32/128 x prompt chunks 128/512/2048 beside the same decodes. Then Llama's
# fidelity cells where the fitted twin misses most (sharegpt and azure_conv at 0.6 and 0.9 x
# capacity, the table's capacity.json), three repeats, until the time limit.
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
cp -r build/skel/fid_llama-3.1-8b $O/
OUT=$O STAGES="transitions transitions_q06" bash benchmarks/h200_session.sh 2>&1 | tail -90 | cut -c1-300; t transitions
export PYTHONPATH=/tmp/site:$PWD
left=$((560 - (SECONDS-S)))
timeout $left python3 benchmarks/fidelity/run_fidelity.py --model llama-3.1-8b --hardware h200 \
  --calibration simulator/calibrations/llama-3.1-8b-h200-tp1.json --out $O/fid_llama-3.1-8b --traces sharegpt,azure_conv \
  --num-requests 100 --repeats 3 --loads 0.6,0.9 --pairs "" --stages real > $O/fid_real_l8.txt 2>&1; echo rc=$?; t fid_real
echo "runs: $(find $O/fid_llama-3.1-8b -name summary.json | wc -l)"
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
