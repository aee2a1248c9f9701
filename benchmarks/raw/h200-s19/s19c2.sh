#!/usr/bin/env bash
# session 19 call 2 (nvidia-h200, ~470 s): Qwen3-0.6B calibrated twice on one machine on the grid
# with padded decode batches across every graph bucket (simulator/profile_grid.padded_decodes),
# over the model-written KV pool, with zero and with random token ids (calibrate.token_ids);
# STREAMS=true profiles with engine.attention_streams on. Files: /tmp/n1/{zero,random}/ and $OUT.
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/c2; mkdir -p $O; nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $O/gpu.txt
cp simulator/calibrations/qwen3-0.6b-h200-tp1.json /tmp/kplan_q06.json
t0=$(date +%s)
for ids in zero random; do
  timeout 285 python3 run.py experiment=calibrate model=qwen3-0.6b hardware=h200 engine.kernel_plan=/tmp/kplan_q06.json \
    engine.attention_streams=${STREAMS:-false} calibrate.token_ids=$ids calibrate.out=$O/$ids/qwen3-0.6b-h200-tp1.json > $O/calibrate_$ids.txt 2>&1
  echo "calibrate token_ids=$ids rc=$? $(( $(date +%s) - t0 )) s"; grep "KV pool\|^decode  \|^mixed  \|shapes" $O/calibrate_$ids.txt | cut -c1-150
done
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c2.tar.xz; split -b 2800k /tmp/c2.tar.xz $OUT/part_; ls $OUT
