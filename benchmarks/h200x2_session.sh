#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (2x H200, torch 2.11, triton 3.6): TP check, then the
# single-GPU engine benchmark with its run breakdown and host profile, then GPU correctness.
# Wheels for what the box lacks travel in .whl/ (see README "GPU machine").
#   STAGES="tp bench check" OUT=/tmp/out bash benchmarks/h200x2_session.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STAGES=${STAGES:-"tp bench check"}
run() { name=$1; t=$2; shift 2; echo "== $name: $*"; timeout $t "$@" > $OUT/$name.txt 2>&1; echo "rc=$?";
        grep -v '^{' $OUT/$name.txt | grep -v -i 'loading\|warn' | tail -n ${TAIL:-14}; tail -n 1 $OUT/$name.txt >> $OUT/results.jsonl; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for stage in $STAGES; do case $stage in
  tp) run check_tp 200 python3 benchmarks/check_tp.py --tp 2 --timeout 150 ;;
  bench) python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
         TAIL=60 run engine_q06_b16 300 python3 benchmarks/bench_engine.py --model /tmp/q06 --block-size 16 \
             --steps-csv $OUT/steps_q06_b16.csv --cprofile 30 ;;
  check) run check_gpu 240 python3 benchmarks/check_gpu.py ;;
esac; done
