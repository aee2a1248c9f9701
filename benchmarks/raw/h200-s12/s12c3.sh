#!/usr/bin/env bash
# Session 12, call 3 (nvidia-h200 alone): the rest of Llama-3.1-8B's fidelity table on one engine
# (this session's, the one its calibration profiled), three repeats: call 2 ran sharegpt and
# azure_conv at 0.6 and 0.9 x capacity (their summaries travel in build/skel, so they are
# skipped). Pass 1 runs sharegpt and azure_conv at 0.3 and 1.2 x and mooncake_conv at 0.6-1.2 x
# (mooncake_conv at 0.3 x, the longest cell, held back by placeholder summaries); pass 2 runs it
# with the time left.
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=$(cat build/commit)
t() { echo "[t=$((SECONDS-S))s] $*"; }
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
F=$O/fid_llama-3.1-8b; cp -r build/skel/fid_llama-3.1-8b $O/
for r in 0 1 2; do mkdir -p $F/real/mooncake_conv-L0/r$r; echo '{"placeholder": true}' > $F/real/mooncake_conv-L0/r$r/summary.json; done
fid() { timeout $1 python3 benchmarks/fidelity/run_fidelity.py --model llama-3.1-8b --hardware h200 \
  --calibration simulator/calibrations/llama-3.1-8b-h200-tp1.json --out $F --traces sharegpt,azure_conv,mooncake_conv \
  --num-requests 100 --repeats 3 --loads 0.3,0.6,0.9,1.2 --pairs "" --stages real >> $O/fid_real_l8.txt 2>&1; echo rc=$?; }
fid $((520 - (SECONDS-S))); t pass1
rm -rf $F/real/mooncake_conv-L0
left=$((575 - (SECONDS-S))); [ $left -gt 60 ] && { fid $left; t pass2; }
echo "runs: $(find $F/real -name summary.json | wc -l)"; find $F/real -name summary.json | sort | tr '\n' ' '; echo
find $F/real -name summary.json -exec grep -l placeholder {} + | xargs -r rm -v
cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/c.tar.xz; ls -la /tmp/c.tar.xz; split -b 2800k /tmp/c.tar.xz $OUT/part_; t done
