#!/usr/bin/env bash
# Session 10, call 1: Qwen3-0.6B re-calibrated on the current engine with the 1,728-shape grid
# (shared-prefix decodes at low re-read shares, 2-3 prompt chunks behind cached context; the
# shipped kernel plan pinned; host_serving recorded), then the fidelity cells x 2 repeats on this
# engine, pinned to the new calibration; last, the W4A16 kernel-plan pin check (issue 13).
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
cp simulator/calibrations/qwen3-0.6b-h200-tp1.json /tmp/kplan.json
KPLAN=/tmp/kplan.json OUT=$O STAGES="calibrate" bash benchmarks/h200_session.sh 2>&1 | grep -v "^profiled" | grep -v "^decode  \|^mixed  " | tail -8; t calibrate
left=$((440 - (SECONDS-S)))
OUT=$O STAGES="fid_real" FID_MODEL=qwen3-0.6b TRACES=azure_conv,mooncake_conv,sharegpt LOADS=0.3,0.6,0.9,1.2 REPEATS=2 NREQ=100 PAIRS= FID_T=$left bash benchmarks/h200_session.sh 2>&1 | grep -v "kept 100 of" | tail -6; t fid_real
left=$((560 - (SECONDS-S)))
[ $left -gt 40 ] && { timeout $left python3 benchmarks/bench_quant.py --model qwen3-0.6b --stages pin --formats gptq,awq > $O/quant_pin.txt 2>&1; echo rc=$?; tail -25 $O/quant_pin.txt; t pin; }
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
