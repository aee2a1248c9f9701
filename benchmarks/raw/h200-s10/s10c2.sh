#!/usr/bin/env bash
# Session 10, call 2: Llama-3.1-8B re-calibrated on the current engine with the 1,728-shape grid,
# then its azure_conv and mooncake_conv fidelity cells (4 loads, 1 repeat, until the time limit),
# pinned to the new calibration's kernel plan.
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
OUT=$O STAGES="calibrate_l8" bash benchmarks/h200_session.sh 2>&1 | grep -v "^profiled" | grep -v "^decode  \|^mixed  " | tail -8; t calibrate_l8
left=$((560 - (SECONDS-S)))
OUT=$O STAGES="fid_real" FID_MODEL=llama-3.1-8b TRACES=azure_conv,mooncake_conv LOADS=0.3,0.6,0.9,1.2 REPEATS=1 NREQ=100 PAIRS= FID_T=$left bash benchmarks/h200_session.sh 2>&1 | grep -v "kept 100 of" | tail -8; t fid_real
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
