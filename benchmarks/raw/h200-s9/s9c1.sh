#!/usr/bin/env bash
# Session 9, call 1: Qwen3-0.6B fidelity cells on the final engine (pinned kernel plan of the
# shipped calibration): azure_conv, mooncake_conv, sharegpt x 4 loads x 2 repeats, 100 requests.
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
OUT=$O STAGES="fid_real" FID_MODEL=qwen3-0.6b TRACES=azure_conv,mooncake_conv,sharegpt LOADS=0.3,0.6,0.9,1.2 REPEATS=2 NREQ=100 PAIRS= FID_T=545 bash benchmarks/h200_session.sh 2>&1 | grep -v "kept 100 of" | tail -20; t fid_real
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
