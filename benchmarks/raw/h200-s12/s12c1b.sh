#!/usr/bin/env bash
# Session 12, call 1b (nvidia-h200-x2, warm after 1a): Llama-3.1-8B at TP=2 profiled on the
# current engine and the 1,881-shape grid (both GPUs; its own kernel plan, timed at start).
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
CAL_T=560 OUT=$O STAGES="calibrate_l8_tp2" bash benchmarks/h200_session.sh 2>&1 | grep -v "^profiled" | grep -v "^decode  \|^mixed  " | tail -30 | cut -c1-600; t calibrate_l8_tp2
cp $O/* $OUT/ 2>/dev/null; ls -la $OUT
