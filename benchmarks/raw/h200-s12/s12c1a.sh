#!/usr/bin/env bash
# Session 12, call 1a (nvidia-h200-x2): tensor parallelism on the current engine after the
# rank>0 padding-row fix: a bare all-reduce, TP=2 greedy tokens against TP=1 (graphs on,
# padding rows), and the three injected worker faults (rank 0 must fail with the worker's error).
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
OUT=$O STAGES="check_tp" bash benchmarks/h200_session.sh 2>&1 | tail -40 | cut -c1-400; t check_tp
cp $O/* $OUT/ 2>/dev/null; ls $OUT
