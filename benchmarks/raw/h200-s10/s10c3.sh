#!/usr/bin/env bash
# Session 10, call 3: the policy-effect pairs of Qwen3-0.6B on the current engine (2 repeats; the
# base cells ran in call 1: their summaries travel in build/skel so they are skipped), then a
# second repeat of Llama-3.1-8B's azure_conv and mooncake_conv cells (first repeat: call 2).
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
cp -r build/skel/* $O/
OUT=$O STAGES="fid_real" FID_MODEL=qwen3-0.6b TRACES=azure_conv,mooncake_conv,sharegpt LOADS=0.3,0.6,0.9,1.2 REPEATS=2 NREQ=100 PAIRS=policy,budget,block_size,prefix_caching FID_T=370 bash benchmarks/h200_session.sh 2>&1 | grep -v "kept 100 of" | tail -6; t pairs
left=$((555 - (SECONDS-S)))
OUT=$O STAGES="fid_real" FID_MODEL=llama-3.1-8b TRACES=azure_conv,mooncake_conv LOADS=0.3,0.6,0.9,1.2 REPEATS=2 NREQ=100 PAIRS= FID_T=$left bash benchmarks/h200_session.sh 2>&1 | grep -v "kept 100 of" | tail -6; t llama
find $O -name summary.json -newer build/s10c3.sh | wc -l
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
