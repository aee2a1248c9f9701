#!/usr/bin/env bash
# Session 20 calls 2-3 (the same nvidia-h200-x2, warm after s20c1.sh): Llama-3.1-8B at TP=2,
# the fidelity table's real cells (3 traces x 4 loads of the capacity the call-1 file's twin
# predicts, 100 requests, 3 repeats), the engine pinned to that file's kernel plan; resumes
# where the last call stopped (run folders with a summary.json are kept). OFFLINE=1 then runs
# the nano-vLLM workload at TP=2 (bench_engine.py --tp 2) with the same plan.
set -u
export PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c2; mkdir -p $O/fid
CAL=/tmp/cal/llama-3.1-8b-h200-tp2.json
STAGES=real; [ -f $O/fid/capacity.json ] || STAGES=capacity,real
t0=$(date +%s)
timeout ${T:-540} python3 benchmarks/fidelity/run_fidelity.py --model llama-3.1-8b --hardware h200 \
    --calibration $CAL --out $O/fid --set engine.tensor_parallel_size=2 \
    --traces azure_conv,sharegpt,mooncake_conv --num-requests 100 --repeats 3 --loads 0.3,0.6,0.9,1.2 \
    --pairs "" --stages $STAGES >> $O/fid.txt 2>&1; echo "fidelity rc=$? $(( $(date +%s) - t0 )) s"
grep "capacity " $O/fid.txt | head -3
find $O/fid/real -name summary.json | sort > $O/done.txt; wc -l < $O/done.txt
if [ "${OFFLINE:-0}" = 1 ]; then
  timeout ${OFF_T:-200} python3 benchmarks/bench_engine.py --model llama-3.1-8b --tp 2 --kernel-plan $CAL > $O/offline_tp2.txt 2>&1
  echo "offline rc=$? $(( $(date +%s) - t0 )) s"; grep -v -i "warn\|loading" $O/offline_tp2.txt | tail -14 | cut -c1-300
fi
nvidia-smi --query-gpu=serial,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
rm -f $OUT/part_*; cd $O && tar --exclude='*/capacity/*' -cf - . | xz -T16 -6 > /tmp/c2.tar.xz; split -b 2800k /tmp/c2.tar.xz $OUT/part_; ls -la $OUT
