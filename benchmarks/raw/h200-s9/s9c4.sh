#!/usr/bin/env bash
# Session 9, call 4 (last): Qwen3-0.6B re-calibrated on the final engine (the grid with few-decode
# mixed shapes, 1,639 shapes; the shipped calibration's kernel plan pinned), then every
# fidelity cell on this engine x 3 repeats, pinned to the new calibration's (same) plan.
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
cp simulator/calibrations/qwen3-0.6b-h200-tp1.json /tmp/kplan.json
KPLAN=/tmp/kplan.json OUT=$O STAGES="calibrate" bash benchmarks/h200_session.sh 2>&1 | grep -v "^profiled" | grep -v "^decode  \|^mixed  " | tail -8; t calibrate
left=$((${BUDGET:-540} - (SECONDS-S) - 12))
OUT=$O STAGES="fid_real" FID_MODEL=qwen3-0.6b TRACES=azure_conv,mooncake_conv,sharegpt LOADS=0.3,0.6,0.9,1.2 REPEATS=3 NREQ=100 PAIRS= FID_T=$left bash benchmarks/h200_session.sh 2>&1 | grep -v "kept 100 of" | tail -6; t fid_real
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
