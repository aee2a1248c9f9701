#!/usr/bin/env bash
# The GPU run behind benchmarks/*.md (H100 80GB, torch 2.11, triton 3.6; one device call).
# Wheels for what the box lacks travel in .whl/ (see README "GPU machine").
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { name=$1; shift; echo "== $name: $*"; timeout 200 "$@" > $OUT/$name.txt 2>&1; grep -v '^{' $OUT/$name.txt | grep -v -i 'loading\|warn' | tail -n 14; tail -n 1 $OUT/$name.txt >> $OUT/results.jsonl; }
python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
run engine_q06_b16 python3 benchmarks/bench_engine.py --model /tmp/q06 --block-size 16
run profile_b256 python3 benchmarks/profile_decode.py --model /tmp/q06 --batch 256
run check_gpu python3 benchmarks/check_gpu.py
run engine_q06_b256 python3 benchmarks/bench_engine.py --model /tmp/q06 --block-size 256 --decode-batches 256
python3 -m engine.checkpoint llama-3.1-8b /tmp/l8 > /dev/null 2>&1
run engine_l8_b16 python3 benchmarks/bench_engine.py --model /tmp/l8 --block-size 16 --decode-batches 1,256
