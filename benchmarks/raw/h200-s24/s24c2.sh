#!/usr/bin/env bash
# Session 24 call 2 (nvidia-h200): on the engine with the split rule of call 1's calibration
# (shortest share 64 tokens, pinned by it):
# 1. Qwen3-0.6B's 36 fidelity-table runs (3 traces x 4 loads x 3 repeats, 100 requests;
#    session 14's loads, build/capacity_q06.json), that calibration pinned;
# 2. issue 9's online row (ShareGPT 400 requests at 16 req/s, the same file pinned) and the
#    offline nano-vLLM workload (bench_engine.py, choices timed, the engine's own rule).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c2; mkdir -p $O/fid
nvidia-smi --query-gpu=name,serial,clocks.sm,temperature.gpu --format=csv,noheader | tee $O/gpu.txt
CAL=$PWD/build/q06new/qwen3-0.6b-h200-tp1.json
cp build/capacity_q06.json $O/fid/capacity.json
t0=$(date +%s)
timeout ${FID_T:-400} python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b --hardware h200 \
   --calibration $CAL --out $O/fid --traces sharegpt,azure_conv,mooncake_conv --num-requests 100 --repeats 3 \
   --loads 0.3,0.6,0.9,1.2 --pairs "" --stages real > $O/fid_real.txt 2>&1
echo "fid rc=$? $(( $(date +%s) - t0 )) s"; find $O/fid/real -name summary.json | wc -l
timeout 100 python3 benchmarks/bench_serving.py --tables online --online "qwen3-0.6b@16" --out /tmp/online16 \
  --override engine.kernel_plan=$CAL > $O/online16.txt 2>&1
echo "online rc=$? $(( $(date +%s) - t0 )) s"; grep -v "^{" $O/online16.txt | tail -6
python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
timeout 120 python3 benchmarks/bench_engine.py --model /tmp/q06 > $O/offline.txt 2>&1
echo "offline rc=$? $(( $(date +%s) - t0 )) s"; grep -v "^{" $O/offline.txt | tail -12
nvidia-smi --query-gpu=clocks.sm,temperature.gpu --format=csv,noheader | tee -a $O/gpu.txt
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c2.tar.xz; split -b 15m /tmp/c2.tar.xz $OUT/part_; ls -la $OUT
