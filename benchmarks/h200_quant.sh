#!/usr/bin/env bash
# Issue 13 on one H200 in one device call (<= 9.5 min): GPTQ / AWQ 4-bit against bf16,
# Llama-3.1-8B random weights (benchmarks/bench_quant.py; each stage's output, tables and a
# last JSON line, lands in $OUT; progress lines go to the same file as they happen).
#   kernels   per Llama-3.1-8B linear shape at M = 1, 16, 32, 64: cuBLAS bf16 against every
#             candidate of the load-time choice on the repacked layout the engine loads (GPTQ
#             group 128; AWQ repacks to the same words and runs the same kernels): the stream
#             and fma kernels at M = 1, the slice, swap and mma kernels at M <= 64, the skinny
#             tiles; M <= 32 with programmatic dependent launch, as decode steps run them
#             (the 3 fastest again without the weight prefetch, /wait, and without PDL,
#             /nopdl): per shape and candidate us, packed-weight GB/s, % of the copy
#             ceiling, bf16 on the same line (fastest first), one process and file per
#             shape (quant_kernels_<shape>.txt), then the summary over the four     <= 4 min
#   engine    the engine on bf16 and GPTQ checkpoints (written first; FORMATS=bf16,gptq,awq
#             adds AWQ, which repacks to the same words: within 1-4% of GPTQ in session 7):
#             load time and the load-time W4A16 choice per layer shape, decode B=1/16/64/256
#             at ~1k context, 2,048-token prefill (device time), KV pool           ~3.5 min
#   profile   where a batch-1 decode step's GPU time goes (profile_decode.py: kernels by GPU
#             time per step: LM head, attention, norms, linears), bf16 (the step without its
#             linears is the same in GPTQ; PROFILE_FORMATS="bf16 gptq" adds GPTQ, ~2.5 min
#             more: its load times the W4A16 candidates again)                   ~0.7 min
#   OUT=$OUT bash benchmarks/h200_quant.sh   # STAGES="kernels engine profile", BUDGET=560 s
set -u
export PYTHONUNBUFFERED=1
# as h200_session.sh: wheels for what the box lacks, when .whl/ is carried
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STAGES=${STAGES:-"kernels engine profile"}; BUDGET=${BUDGET:-560}; KERNELS_S=${KERNELS_S:-240}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'
for stage in $STAGES; do
  left=$((BUDGET - SECONDS))
  if [ $left -lt 60 ]; then echo "skipped stage $stage (${left}s of BUDGET $BUDGET left)"; continue; fi
  echo "== stage $stage (at ${SECONDS}s, ${left}s left)"
  case $stage in
    kernels)  t=$((left < KERNELS_S ? left : KERNELS_S)); deadline=$((SECONDS + t)); rest=3
              for shape in qkv o gate_up down; do   # a process each: a crash or hang costs one shape
                share=$((deadline - SECONDS - 35 * rest)); rest=$((rest - 1))   # (the first compiles)
                [ $share -lt 20 ] && { echo "$shape skipped (${share}s of KERNELS_S left)"; continue; }
                timeout $share python3 benchmarks/bench_quant.py --stages layers --layers $shape \
                  --layer-m 1,16,32,64 --kernel-formats gptq --layouts repacked --copies 8 --repeats 10 \
                  > $OUT/quant_kernels_$shape.txt 2>&1; echo "$shape rc=$? (${share}s allowed)"
              done
              python3 benchmarks/bench_quant.py --summarize $OUT/quant_kernels_{qkv,o,gate_up,down}.txt ;;
    engine|engine_q)   # (engine_q: h200_session.sh's older name)
              timeout $left python3 benchmarks/bench_quant.py --stages engine --formats ${FORMATS:-bf16,gptq} \
                --decode-batches 1,16,64,256 --time-budget $((left - 10)) \
                > $OUT/quant_engine.txt 2>&1; echo "rc=$?"
              grep -v '^{' $OUT/quant_engine.txt | grep -v '^\[' | tail -n 50 ;;
    profile)  for fmt in ${PROFILE_FORMATS:-bf16}; do   # the engine stage's checkpoints (written here if absent)
                left=$((BUDGET - SECONDS)); [ $left -lt 45 ] && { echo "skipped profile $fmt (${left}s left)"; continue; }
                dir=$(python3 -c "import sys; sys.argv = ['x']; sys.path.insert(0, 'benchmarks')
from bench_quant import checkpoint; print(checkpoint('llama-3.1-8b', '$fmt', 'bfloat16', False))" | tail -n 1)
                timeout $left python3 benchmarks/profile_decode.py --model $dir --batch 1 --context 1024 \
                  --top 25 --timeline 0 > $OUT/profile_b1_$fmt.txt 2>&1; echo "rc=$?"
                grep -v '^{' $OUT/profile_b1_$fmt.txt | tail -n 30
              done ;;
    *) echo "unknown stage $stage (kernels, engine, profile)" ;;
  esac
done
