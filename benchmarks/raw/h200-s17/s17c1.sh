#!/usr/bin/env bash
# session 17 call 1 (nvidia-h200): does serving's data (random token ids, a filled KV pool) make
# Llama-3.1-8B's steps slower than the profile's all-zero prompts? Two probes of the same
# question (per shape; and prompt steps inside a run of decodes), then the attention-overlap
# stage of issue 9. Run from the repository root with .whl/ and build/ carried.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=$OUT; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.limit,temperature.gpu,serial --format=csv,noheader | tee $O/gpu.txt
K=simulator/calibrations/llama-3.1-8b-h200-tp1.json
t0=$(date +%s)
timeout ${PT:-200} python3 benchmarks/fidelity/probe_engines.py --model llama-3.1-8b --hardware h200 --engines 1 \
    --batches 1,8,16,32,64 --chunks 512,2048,6656 --calibration $K --set engine.kernel_plan=$K > $O/probe_engines.txt 2>&1
echo "probe_engines rc=$? $(( $(date +%s) - t0 )) s"; grep -v -i "random weights\|warn\|loading" $O/probe_engines.txt | tail -22 | cut -c1-300
t0=$(date +%s)
timeout ${TT:-150} python3 benchmarks/probe_transitions.py --model llama-3.1-8b --kernel-plan $K --stages tokens --decodes 8 \
    --chunk 2048,512 --run 16 --burst 12 > $O/probe_tokens.txt 2>&1
echo "probe_tokens rc=$? $(( $(date +%s) - t0 )) s"; grep -v -i "random weights\|warn\|loading" $O/probe_tokens.txt | tail -14 | cut -c1-300
t0=$(date +%s)
timeout ${OT:-120} python3 benchmarks/bench_attention.py --stages overlap --no-flashinfer > $O/overlap.txt 2>&1
echo "overlap rc=$? $(( $(date +%s) - t0 )) s"; grep -v -i "warn" $O/overlap.txt | tail -14 | cut -c1-300
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader | tee -a $O/gpu.txt
