#!/usr/bin/env bash
# The tensor-parallel run behind benchmarks/engine_tp.md (2x H200, torch 2.11, triton 3.6; one device call).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { name=$1; t=$2; shift 2; echo "== $name: $*"; timeout $t "$@" > $OUT/$name.txt 2>&1; grep -v '^{' $OUT/$name.txt | grep -v -i 'loading\|warn' | tail -n 12; tail -n 1 $OUT/$name.txt >> $OUT/results.jsonl; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run check_tp 120 python3 benchmarks/check_tp.py --tp 2
python3 -m engine.checkpoint llama-3.1-8b /tmp/l8 > /dev/null 2>&1
run engine_l8_tp1 110 python3 benchmarks/bench_engine.py --model /tmp/l8 --decode-batches 256
run engine_l8_tp2 110 python3 benchmarks/bench_engine.py --model /tmp/l8 --tp 2 --decode-batches 256
python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
run engine_q06_b16 90 python3 benchmarks/bench_engine.py --model /tmp/q06 --decode-batches 1,64,256
