#!/usr/bin/env bash
# Session 22 call 1-2 (nvidia-h200, ~6-9 min): each shipped TP=1 calibration's attention cost
# at KV blocks 32 and 64 measured on its model's own steps (experiments.block_cost), into
# copies under /tmp/bc (the shipped files stay as they are until the tables say so). Then on
# the CPU: run_fidelity.py --stages sim,table on session 21's Llama pair runs
# (raw/h200-s21/llama-3.1-8b-pairs-runs.tar.xz) and session 19's Qwen pair runs with each copy:
# does the block-size pair (Llama 40 / 54) improve?
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/bc; mkdir -p $O; rm -f $OUT/part_*; nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $O/gpu.txt
for m in ${MODELS:-qwen3-0.6b llama-3.1-8b}; do   # MODELS=llama-3.1-8b: one per call if 600 s is short
  for ext in json profile.parquet; do cp simulator/calibrations/$m-h200-tp1.$ext $O/; done
  t0=$(date +%s)
  timeout 420 python3 -m experiments.calibrate --block-cost 32,64 model=$m hardware=h200 \
      calibrate.out=$O/$m-h200-tp1.json > $O/block_cost_$m.txt 2>&1
  echo "$m rc=$? $(( $(date +%s) - t0 )) s"; tail -8 $O/block_cost_$m.txt | cut -c1-220
done
cd $O && tar -cf - . | xz -T16 -6 > /tmp/bc.tar.xz; split -b 2800k /tmp/bc.tar.xz $OUT/part_; ls $OUT
