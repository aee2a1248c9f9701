#!/usr/bin/env bash
# Session 22 call 3 (nvidia-h200, ~5 min): where the GPTQ engine's 1.7 GB of torch cache at KV
# sizing sits (issue 13's KV-pool target): benchmarks/profile_memory.py on Llama-3.1-8B GPTQ
# (random weights, bench_quant's checkpoint), allocator segments with free space and the
# allocation sites that pin them; bf16 after it if time is left.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
for fmt in ${FORMATS:-gptq bf16}; do
  dir=$(cd benchmarks && python3 -c "import sys; sys.argv = ['x']
from bench_quant import checkpoint; print(checkpoint('llama-3.1-8b', '$fmt', 'bfloat16', False))" | tail -n 1)
  timeout ${LIMIT:-400} python3 benchmarks/profile_memory.py --model $dir --top 15 > $OUT/memory_$fmt.txt 2>&1
  echo "$fmt rc=$? at ${SECONDS}s"; grep -v '^{' $OUT/memory_$fmt.txt | grep -v Warning | tail -40 | cut -c1-250
done
