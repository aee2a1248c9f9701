#!/usr/bin/env bash
# Session 24 call 1 (nvidia-h200): the decode attention's split rule pinned by a kernel plan.
# 1. Qwen3-0.6B step table with the shipped calibration pinned (its recorded rule: shortest
#    share 128 tokens) against its kernel plan alone (skinny choices, no rule: the engine's
#    own, 64 tokens), A/B/A/B on one machine;
# 2. Qwen3-0.6B re-calibrated on that engine (the shipped file's settings: token ids zero, its
#    kernel plan pinned without the rule), then its idle cost (--idle-cost).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c1; mkdir -p $O
nvidia-smi --query-gpu=name,serial,clocks.sm,temperature.gpu --format=csv,noheader | tee $O/gpu.txt
CAL=simulator/calibrations/qwen3-0.6b-h200-tp1.json
python3 -c "import json; json.dump(json.load(open('$CAL'))['kernel_plan'], open('/tmp/kplan_q06.json', 'w'))"
python3 -m engine.checkpoint qwen3-0.6b /tmp/q06 > /dev/null 2>&1
t0=$(date +%s)
for p in ${PLANS:-cal own cal own}; do
  [ $p = cal ] && plan=$CAL || plan=/tmp/kplan_q06.json
  timeout 100 python3 benchmarks/bench_serving.py --tables steps --model /tmp/q06 --decode-batches 1,4,16,64 \
    --mixed-batches 64 --chunks 16 --kernel-plan $plan > $O/steps_$p.$(date +%s).txt 2>&1
  echo "steps $p rc=$? $(( $(date +%s) - t0 )) s"; grep -A6 "^decodes" $(ls -t $O/steps_$p.* | head -1) | cut -c1-72
done
mkdir -p $O/q06
timeout 330 python3 run.py experiment=calibrate model=qwen3-0.6b hardware=h200 engine.kernel_plan=/tmp/kplan_q06.json \
  engine.attention_streams=false calibrate.token_ids=zero calibrate.out=$O/q06/qwen3-0.6b-h200-tp1.json > $O/q06/calibrate.txt 2>&1
echo "calibrate rc=$? $(( $(date +%s) - t0 )) s"; grep "KV pool\|^decode  \|^mixed  \|shapes\|held" $O/q06/calibrate.txt | cut -c1-160 | head
timeout 170 python3 -m experiments.calibrate --idle-cost model=qwen3-0.6b hardware=h200 calibrate.repeats=3 \
  calibrate.out=$O/q06/qwen3-0.6b-h200-tp1.json > $O/q06/idle_cost.txt 2>&1
echo "idle rc=$? $(( $(date +%s) - t0 )) s"; grep -A14 "^the step after idle" $O/q06/idle_cost.txt | cut -c1-160
python3 -c "import json; d=json.load(open('$O/q06/qwen3-0.6b-h200-tp1.json')); print(d['decode_plan'])"
nvidia-smi --query-gpu=clocks.sm,temperature.gpu --format=csv,noheader | tee -a $O/gpu.txt
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c1.tar.xz; split -b 15m /tmp/c1.tar.xz $OUT/part_; ls -la $OUT
