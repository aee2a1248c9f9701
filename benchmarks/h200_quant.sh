#!/usr/bin/env bash
# Issue 13 on one H200: GPTQ / AWQ 4-bit against bf16, Llama-3.1-8B random weights
# (benchmarks/bench_quant.py; each stage prints its table and one JSON line into $OUT).
#   kernels     W4A16 kernels per linear shape and M, their error against the torch
#               reference, the tile sweep, and the bf16 greedy check (small model)  ~3 min
#   engine_bf16 the engine on bf16 Llama-3.1-8B: decode B=1/16/64/256 at ~1k context,
#               2,048-token prefill, KV pool, nano-vLLM workload                    ~4 min
#   engine_q    the same for GPTQ and AWQ checkpoints (written first, on the GPU)    ~6 min
# Two device calls keep each under 10 minutes:
#   STAGES="kernels engine_bf16" OUT=$OUT bash benchmarks/h200_quant.sh
#   STAGES="engine_q" OUT=$OUT bash benchmarks/h200_quant.sh
# A stage that would start after BUDGET seconds (default 420) is skipped, saying so.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STAGES=${STAGES:-"kernels engine_bf16"}; BUDGET=${BUDGET:-420}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'
for stage in $STAGES; do
  if [ $SECONDS -gt $BUDGET ]; then echo "skipped stage $stage (${SECONDS}s > BUDGET $BUDGET)"; continue; fi
  echo "== stage $stage (at ${SECONDS}s)"
  case $stage in
    kernels) python3 benchmarks/bench_quant.py --stages layers,check --sweep 2>&1 | tee $OUT/quant_kernels.txt ;;
    engine_bf16) python3 benchmarks/bench_quant.py --stages engine --formats bf16 --nano 2>&1 | tee $OUT/quant_engine_bf16.txt ;;
    engine_q) python3 benchmarks/bench_quant.py --stages engine --formats gptq,awq --nano 2>&1 | tee $OUT/quant_engine_q.txt ;;
    *) echo "unknown stage $stage (kernels, engine_bf16, engine_q)" ;;
  esac
done
