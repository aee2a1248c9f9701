#!/usr/bin/env bash
# Next session, call 1 (nvidia-h200, ~450 s): Qwen3-0.6B profiled twice on one machine over a
# model-written KV pool, with zero token ids and with random ones (calibrate.token_ids), files
# under /tmp/n1/{zero,random}/ (and $OUT). Call 2 (n2.sh, the same warm machine): the 36 table runs.
# Run from the repository root with .whl/ and build/ carried (build/commit, build/capacity_q06.json).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/n1; mkdir -p $O; nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $O/gpu.txt
cp simulator/calibrations/qwen3-0.6b-h200-tp1.json /tmp/kplan_q06.json
t0=$(date +%s)
for ids in zero random; do
  timeout 220 python3 run.py experiment=calibrate model=qwen3-0.6b hardware=h200 engine.kernel_plan=/tmp/kplan_q06.json \
    calibrate.token_ids=$ids calibrate.out=$O/$ids/qwen3-0.6b-h200-tp1.json > $O/calibrate_$ids.txt 2>&1
  echo "calibrate token_ids=$ids rc=$? $(( $(date +%s) - t0 )) s"; grep "KV pool\|^decode  \|^mixed  " $O/calibrate_$ids.txt | cut -c1-150
done
cd $O && tar -cf - . | xz -T16 -6 > /tmp/n1.tar.xz; split -b 2800k /tmp/n1.tar.xz $OUT/part_; ls $OUT
