#!/usr/bin/env bash
# Session 11, call 1 (nvidia-h200 alone): Qwen3-0.6B re-profiled on the 1,881-shape grid (the
# shipped kernel plan pinned; host_serving measured with timed admissions), then the third repeat
# of every fidelity cell and policy pair (r0/r1 summaries travel in build/skel so only r2 runs;
# capacity.json travels too, so the loads are the table's), then the AWQ kernel-plan pin (issue 13).
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
cp simulator/calibrations/qwen3-0.6b-h200-tp1.json /tmp/kplan.json
cp -r build/skel/fid_qwen3-0.6b $O/
KPLAN=/tmp/kplan.json OUT=$O STAGES="calibrate" bash benchmarks/h200_session.sh 2>&1 | grep -v "^profiled" | grep -v "^decode  \|^mixed  " | tail -12; t calibrate
export PYTHONPATH=/tmp/site:$PWD
left=$((470 - (SECONDS-S)))
timeout $left python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b --hardware h200 \
  --calibration /tmp/kplan.json --out $O/fid_qwen3-0.6b --traces azure_conv,mooncake_conv,sharegpt \
  --num-requests 100 --repeats 3 --loads 0.3,0.6,0.9,1.2 --pairs policy,budget,block_size,prefix_caching \
  --stages real > $O/fid_real_q.txt 2>&1; echo rc=$?; grep -v "kept 100 of" $O/fid_real_q.txt | tail -5; t fid_real
echo "r2 runs: $(find $O/fid_qwen3-0.6b -path '*r2/summary.json' | wc -l)"
left=$((565 - (SECONDS-S)))
[ $left -gt 40 ] && { timeout $left python3 benchmarks/bench_quant.py --model qwen3-0.6b --stages pin --formats awq > $O/quant_pin.txt 2>&1; echo rc=$?; tail -15 $O/quant_pin.txt; t pin; }
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
