#!/usr/bin/env bash
# Session 23 call 4 (nvidia-h200): each decode GEMM, launched early under PDL, also asks L2 for
# the next GEMM's weights of the layer chain (TWINSERVE_PREFETCH_NEXT=1, an experiment), A/B on
# Qwen3-0.6B's step table (decode B = 1 / 16 / 64, 64 + 16), the kernel plan pinned; then what
# this triton compiles the skinny GEMM to for sm_90 (shared memory: is the K loop pipelined?).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
KP=simulator/calibrations/qwen3-0.6b-h200-tp1.json
t0=$(date +%s)
python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
for nx in 1 0 1; do
  TWINSERVE_PREFETCH_NEXT=$nx timeout 150 python3 benchmarks/bench_serving.py --tables steps --model /tmp/q06 \
    --decode-batches 1,16,64 --mixed-batches 64 --chunks 16 --kernel-plan $KP > $OUT/steps_next$nx.$SECONDS.txt 2>&1
  echo "next=$nx rc=$? $(( $(date +%s) - t0 )) s"; ls -t $OUT/steps_next$nx.* | head -1 | xargs grep -A6 "^decodes" | cut -c1-100
done
python3 - <<'PY' 2>&1 | grep -v -i warn
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels import skinny_gemm as sk
params = list(inspect.signature(sk._skinny_gemm_kernel.fn).parameters)
for norm in (False, True):
    const = dict(HAS_BIAS=False, SPLIT=True, IEEE=False, SWIGLU=False, NORM=norm, HAS_RESIDUAL=norm, BLOCK_M=16,
                 BLOCK_N=64, BLOCK_K=128, PDL=True, PREFETCH=True, ELEM_BYTES=2, NEXT_PIECES=0, next_ptr=None)
    sig = {p: "constexpr" if p in const else "*bf16" if p in ("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "res_ptr",
           "norm_w_ptr", "res_out_ptr") else "*fp32" if p == "partial_ptr" else "*i32" if p == "arrivals_ptr"
           else "fp32" if p == "eps" else "i32" for p in params}
    k = triton.compile(ASTSource(fn=sk._skinny_gemm_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 4})
    print(f"triton {triton.__version__} skinny norm={norm}: shared {k.metadata.shared} B, "
          f"cp.async {k.asm['ptx'].count('cp.async.cg') + k.asm['ptx'].count('cp.async.ca')}")
PY
