#!/usr/bin/env bash
# session 18 call 4 (the same nvidia-h200, warm): Qwen3-0.6B's data probe (all-zero ids and KV /
# random KV / random ids and KV, with call 1's calibration as the file column), then issue 9's
# small step-cost table and the offline nano-vLLM workload at this commit (call 1's kernel plan).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
[ -f /tmp/o/calibrations_q06.tgz ] && tar xzf /tmp/o/calibrations_q06.tgz && echo "call 1's calibration"
t0=$(date +%s)
timeout 130 python3 benchmarks/fidelity/probe_engines.py --model qwen3-0.6b --hardware h200 --engines 1 \
  --batches 1,8,16,32,64 --chunks 512,2048,6656 --calibration simulator/calibrations/qwen3-0.6b-h200-tp1.json \
  > $OUT/probe_engines_q06.txt 2>&1; echo "probe rc=$? $(( $(date +%s) - t0 )) s"; grep -v "^{" $OUT/probe_engines_q06.txt | tail -13
KPLAN=simulator/calibrations/qwen3-0.6b-h200-tp1.json STAGES="steps_small offline" OUT=$OUT bash benchmarks/h200_session.sh
echo "done $(( $(date +%s) - t0 )) s"
