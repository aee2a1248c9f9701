#!/usr/bin/env bash
# Session 24 call 4 (nvidia-h200): correctness after the split rule's change (shortest share
# 128 -> 64 tokens: more shares, so more merges, at small batches): the compiled kernel tests
# (tests/test_kernels.py, tests/test_fusion.py) and check_gpu.py (fp32 greedy tokens against
# transformers, bf16 logit error) on the Triton backend.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
t0=$(date +%s)
TRITON_INTERPRET=0 timeout ${KT:-120} python3 -m pytest -q -p no:cacheprovider -p no:randomly tests/test_kernels.py tests/test_fusion.py > $OUT/kernels_gpu.txt 2>&1
echo "kernels rc=$? $(( $(date +%s) - t0 )) s"; tail -3 $OUT/kernels_gpu.txt
timeout ${CT:-270} python3 benchmarks/check_gpu.py --backends triton > $OUT/check_gpu.txt 2>&1
echo "check rc=$? $(( $(date +%s) - t0 )) s"; grep -v "^{" $OUT/check_gpu.txt | tail -40
