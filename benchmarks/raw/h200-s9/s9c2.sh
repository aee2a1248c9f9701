#!/usr/bin/env bash
# Session 9, call 2: Llama-3.1-8B calibration on the final engine (its kernel plan recorded),
# then sharegpt fidelity cells pinned to that plan (4 loads, repeats until the time limit).
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
OUT=$O STAGES="calibrate_l8" bash benchmarks/h200_session.sh 2>&1 | grep -v "^profiled" | tail -12; t calibrate_l8
left=$((575 - (SECONDS-S) - 15))
OUT=$O STAGES="fid_real" FID_MODEL=llama-3.1-8b TRACES=sharegpt LOADS=0.3,0.6,0.9,1.2 REPEATS=2 NREQ=100 PAIRS= FID_T=$left bash benchmarks/h200_session.sh 2>&1 | tail -8; t fid_real
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
