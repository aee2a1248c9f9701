#!/usr/bin/env bash
# session 13 call 1: KV layout (scattered as profiled vs in order) on both models, Llama's clock recovery
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=$OUT; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee $O/gpu.txt
python3 -m engine.checkpoint qwen3-0.6b /tmp/twinserve-qwen3-0.6b > /dev/null 2>&1
python3 -m engine.checkpoint llama-3.1-8b /tmp/twinserve-llama-3.1-8b > /dev/null 2>&1
for cd in 512:8,32,128,256 2048:8,32,128,256 6144:8,32,96; do ctx=${cd%%:*}; ds=${cd#*:}
  timeout 150 python3 benchmarks/probe_transitions.py --model /tmp/twinserve-qwen3-0.6b --kernel-plan simulator/calibrations/qwen3-0.6b-h200-tp1.json \
     --stages layout --decodes $ds --context $ctx > $O/layout_q06_c$ctx.txt 2>&1; echo "q06 ctx $ctx rc=$?"; grep -v "^{" $O/layout_q06_c$ctx.txt | tail -12
done
timeout 200 python3 benchmarks/probe_transitions.py --model /tmp/twinserve-llama-3.1-8b --kernel-plan simulator/calibrations/llama-3.1-8b-h200-tp1.json \
     --stages layout,recovery --decodes 8,32,128 --chunk 2048 --context 3072 > $O/transitions_more_l8.txt 2>&1; echo "l8 rc=$?"; grep -v "^{" $O/transitions_more_l8.txt | tail -40
