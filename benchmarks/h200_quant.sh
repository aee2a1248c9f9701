#!/usr/bin/env bash
# Issue 13 on one H200 in one device call (<= 9 min): GPTQ / AWQ 4-bit against bf16,
# Llama-3.1-8B random weights (benchmarks/bench_quant.py; each stage's output, tables and a
# last JSON line, lands in $OUT; progress lines go to the same file as they happen).
#   engine_q  the engine on GPTQ and AWQ checkpoints (written first): load time and the
#             load-time W4A16 choice per layer shape, decode B=1/16/64/256 at ~1k context,
#             2,048-token prefill (device time), KV pool, nano-vLLM workload (skipped, saying
#             so, when its --time-budget share is spent); against this morning's bf16 engine
#             run (benchmarks/raw/h200_quant_engine_bf16.txt)                        ~5 min
#   kernels   every W4A16 launch the choice considers per Llama-3.1-8B linear shape and M
#             against cuBLAS bf16, the bf16 greedy check (small model), the tile sweep; the
#             check formats and the sweep are skipped when BUDGET is spent           ~3-4 min
#   OUT=$OUT bash benchmarks/h200_quant.sh        # STAGES="engine_q kernels", BUDGET=520 s
set -u
export PYTHONUNBUFFERED=1
# as h200_session.sh: wheels for what the box lacks, when .whl/ is carried
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STAGES=${STAGES:-"engine_q kernels"}; BUDGET=${BUDGET:-520}; ENGINE_S=${ENGINE_S:-300}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'
for stage in $STAGES; do
  left=$((BUDGET - SECONDS))
  if [ $left -lt 60 ]; then echo "skipped stage $stage (${left}s of BUDGET $BUDGET left)"; continue; fi
  echo "== stage $stage (at ${SECONDS}s, ${left}s left)"
  case $stage in
    engine_q) t=$((left < ENGINE_S ? left : ENGINE_S))
              timeout $t python3 benchmarks/bench_quant.py --stages engine --formats gptq,awq --nano \
                --reference benchmarks/raw/h200_quant_engine_bf16.txt --time-budget $((t - 15)) \
                > $OUT/quant_engine_q.txt 2>&1; echo "rc=$?"
              grep -v '^{' $OUT/quant_engine_q.txt | tail -n 40 ;;
    kernels)  timeout $left python3 benchmarks/bench_quant.py --stages layers,check --sweep \
                --time-budget $((left - 10)) > $OUT/quant_kernels.txt 2>&1; echo "rc=$?"
              grep -v '^{' $OUT/quant_kernels.txt | grep -v '^\[' | tail -n 60 ;;
    *) echo "unknown stage $stage (engine_q, kernels)" ;;
  esac
done
