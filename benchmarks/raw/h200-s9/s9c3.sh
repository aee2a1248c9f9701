#!/usr/bin/env bash
# Session 9, call 3: one more repeat of every fidelity cell (Qwen3-0.6B: 3 traces x 4 loads;
# Llama-3.1-8B: sharegpt x 4 loads), each pinned to its calibration's kernel plan.
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
OUT=$O STAGES="fid_real" FID_MODEL=qwen3-0.6b TRACES=azure_conv,mooncake_conv,sharegpt LOADS=0.3,0.6,0.9,1.2 REPEATS=1 NREQ=100 PAIRS= FID_T=200 bash benchmarks/h200_session.sh 2>&1 | grep -v "kept 100 of" | tail -6; t qwen
OUT=$O STAGES="fid_real" FID_MODEL=llama-3.1-8b TRACES=sharegpt LOADS=0.3,0.6,0.9,1.2 REPEATS=1 NREQ=100 PAIRS= FID_T=300 bash benchmarks/h200_session.sh 2>&1 | tail -6; t llama
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
