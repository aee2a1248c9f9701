#!/usr/bin/env bash
# session 19 call 1 (nvidia-h200, ~360 s): EngineConfig.attention_streams on a GPU for the first
# time: fp32 greedy tokens equal to transformers with it on (check_gpu's graphs and streams cases),
# the mixed-step A/B (64 and 256 decodes + 16-2,048 prompt tokens, one engine each, the shipped
# kernel plan), and ShareGPT 400 requests at 16 req/s with it off and on (issue 9's online row).
# Run from the repository root with .whl/ and build/ carried.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c1; mkdir -p $O; nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $O/gpu.txt
KP=simulator/calibrations/qwen3-0.6b-h200-tp1.json
t0=$(date +%s); el() { echo "$1 rc=$2 $(( $(date +%s) - t0 )) s"; }
timeout 200 python3 benchmarks/check_gpu.py --backends triton --cases graphs,streams > $O/check_streams.txt 2>&1; el check $?
grep "^check=" $O/check_streams.txt
[ -f /tmp/q06/config.json ] || python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
MIXED="python3 benchmarks/bench_serving.py --tables steps --model /tmp/q06 --decode-batches 64 --mixed-batches 64,256 --chunks 16,128,512,2048 --kernel-plan $KP"
timeout 200 $MIXED > $O/steps_mixed_one_stream.txt 2>&1; el one_stream $?
timeout 200 $MIXED --attention-streams > $O/steps_mixed_streams.txt 2>&1; el streams $?
for f in one_stream streams; do echo "== $f"; grep -v "^{" $O/steps_mixed_$f.txt | grep -i -v "warn\|loading" | tail -14; done
for s in false true; do
  timeout 170 python3 benchmarks/bench_serving.py --tables online --online "qwen3-0.6b@16" --out /tmp/online_$s \
    --override engine.kernel_plan=$PWD/$KP engine.attention_streams=$s > $O/online16_streams_$s.txt 2>&1; el online_$s $?
  grep -v "^{" $O/online16_streams_$s.txt | tail -6
done
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c1.tar.xz; split -b 2800k /tmp/c1.tar.xz $OUT/part_; ls $OUT
