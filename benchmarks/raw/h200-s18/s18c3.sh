#!/usr/bin/env bash
# session 18 call 3 (nvidia-h200): issue 10's replay target with asynchronous scheduling on and off
# (the ShareGPT 400-request replay at 8 / 16 / 32 req/s, Qwen3-0.6B; each run replayed on
# the CPU with cost_model=replay), then issue 9's attention-overlap stage (a device-side assert in
# session 17; once more under CUDA_LAUNCH_BLOCKING=1 if it fails again, to name the op).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/o3; mkdir -p $O; nvidia-smi --query-gpu=name,clocks.sm,power.limit,serial --format=csv,noheader | tee $O/gpu.txt
t0=$(date +%s)
for a in true false; do for r in 8 16 32; do
  timeout 120 python3 run.py mode=gpu model=qwen3-0.6b hardware=h200 trace=sharegpt trace.num_requests=400 \
    trace.request_rate=$r engine.async_scheduling=$a engine.kernel_plan=simulator/calibrations/qwen3-0.6b-h200-tp1.json \
    logger=none progress=false hydra.run.dir=$O/replay/async_${a}_rps$r > $O/replay_async_${a}_rps$r.txt 2>&1
  echo "async=$a rps=$r rc=$? $(( $(date +%s) - t0 )) s"; grep -i "tok/s\|TPOT" $O/replay_async_${a}_rps$r.txt | tail -2 | cut -c1-200
done; done
timeout 150 python3 benchmarks/bench_attention.py --stages overlap --no-flashinfer > $O/overlap.txt 2>&1; rc=$?
echo "overlap rc=$rc $(( $(date +%s) - t0 )) s"; grep -v IndexKernel $O/overlap.txt | tail -12 | cut -c1-250
if [ $rc -ne 0 ]; then
  CUDA_LAUNCH_BLOCKING=1 timeout 150 python3 benchmarks/bench_attention.py --stages overlap --no-flashinfer > $O/overlap_blocking.txt 2>&1
  echo "overlap (launch blocking) rc=$?"; grep -v IndexKernel $O/overlap_blocking.txt | grep -B2 -A14 Traceback | head -34 | cut -c1-250
fi
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c3.tar.xz; split -b 2800k /tmp/c3.tar.xz $OUT/part_; ls -la $OUT
