#!/usr/bin/env bash
# Session 22 call 4 (nvidia-h200, ~7 min): bench_quant's engine stage (bf16 then GPTQ in one
# process) after engine.kernels.buffers: does the GPTQ engine's KV pool now grow by the memory
# its weights free (call 3 found 1.7 GB of torch's cache pinned by the bf16 engine's buffers)?
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
STAGES=engine BUDGET=${BUDGET:-500} OUT=$OUT bash benchmarks/h200_quant.sh
