#!/usr/bin/env bash
# Device calls on nvidia-h200-x2 (2x H200, torch 2.11, triton 3.6). Each STAGE is one run;
# outputs land in $OUT (one .txt per run, the last JSON line of each in results.jsonl).
# Wheels for what the box lacks travel in .whl/ (see README "GPU machine").
#   STAGES="tp bench_q06 sampler flashinfer" OUT=/tmp/out bash benchmarks/h200x2_session.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { name=$1; t=$2; shift 2; echo "== $name: $*"; timeout $t "$@" > $OUT/$name.txt 2>&1; echo "rc=$?";
        grep -v '^{' $OUT/$name.txt | grep -v -i 'loading\|warn' | tail -n ${TAIL:-14}; tail -n 1 $OUT/$name.txt >> $OUT/results.jsonl; }
ckpt() { [ -f /tmp/$2/config.json ] || python3 -m engine.checkpoint $1 /tmp/$2 > /dev/null 2>&1; }
BENCH="python3 benchmarks/bench_engine.py"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for stage in ${STAGES:-tp bench_q06 check}; do case $stage in
  tp)          run check_tp 200 python3 benchmarks/check_tp.py --tp 2 --timeout 150 ;;
  bench_q06)   ckpt qwen3-0.6b q06; TAIL=24 run engine_q06_b16 240 $BENCH --model /tmp/q06 --steps-csv $OUT/steps_q06_b16.csv ;;
  profile_q06) ckpt qwen3-0.6b q06; TAIL=60 run engine_q06_b16_prof 300 $BENCH --model /tmp/q06 --cprofile 30 --decode-batches 256 ;;
  b256)        ckpt qwen3-0.6b q06; run engine_q06_b256 120 $BENCH --model /tmp/q06 --block-size 256 --decode-batches 256 ;;
  blocks)      ckpt qwen3-0.6b q06; for b in 32 64; do run engine_q06_b$b 150 $BENCH --model /tmp/q06 --block-size $b --decode-batches 256; done ;;
  nograph)     ckpt qwen3-0.6b q06; run engine_q06_eager 150 $BENCH --model /tmp/q06 --enforce-eager --decode-batches 1,256 ;;
  sampler)     run bench_sampler 120 python3 benchmarks/bench_sampler.py ;;
  flashinfer)  run check_flashinfer 150 python3 benchmarks/check_flashinfer.py
               ckpt qwen3-0.6b q06; run engine_q06_fi 150 $BENCH --model /tmp/q06 --backend flashinfer --decode-batches 1,256 ;;
  l8)          ckpt llama-3.1-8b l8; run engine_l8_tp1 200 $BENCH --model /tmp/l8 --decode-batches 1,256 ;;
  tp_l8)       ckpt llama-3.1-8b l8; run engine_l8_tp2 240 $BENCH --model /tmp/l8 --tp 2 --decode-batches 1,256 ;;
  check)       run check_gpu 300 python3 benchmarks/check_gpu.py ;;
  replay)      R="trace=sharegpt trace.num_requests=${NREQ:-1000} trace.request_rate=${RATE:-30} hardware=h200 logger=none progress=false"
               TAIL=30 run gpu_replay 200 python3 run.py mode=gpu $R hydra.run.dir=/tmp/gpu_run
               run sim_replay 60 python3 run.py mode=sim $R hydra.run.dir=/tmp/sim_run
               TAIL=40 run sim_vs_gpu 60 python3 -m analysis --compare /tmp/sim_run /tmp/gpu_run --out /tmp/cmp ;;
esac; done
