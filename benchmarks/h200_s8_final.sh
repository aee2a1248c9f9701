#!/usr/bin/env bash
# Session 8, last device call: the folded decode launch (branch attn) A/B, correctness,
# the serving figures on the faster setting, and the Qwen3-0.6B calibration on this engine.
set -u
S=$SECONDS; O=/tmp/o; mkdir -p $O
export TWINSERVE_COMMIT=${TWINSERVE_COMMIT:-$(cat build/commit)} KPLAN=/tmp/kplan.json   # the first engine times and writes the plan, every later one reads it
t() { echo "[t=$((SECONDS-S))s] $*"; }
OUT=$O STAGES="check" bash benchmarks/h200_session.sh 2>&1 | grep -v "^check=fp32" | tail -6; t check
for f in none merge merge,qkv; do
  TWINSERVE_DECODE_FOLD=$f OUT=$O/fold_${f/,/_} STAGES="steps_small" bash benchmarks/h200_session.sh 2>&1 | grep -E "^ +(1|16|64) " ; t "steps fold=$f"
done
best=$(python3 - <<'PY'
import json
best = None
for f in ["none", "merge", "merge,qkv"]:
    rows = json.loads(open(f"/tmp/o/fold_{f.replace(',', '_')}/steps_small.txt").read().strip().splitlines()[-1])["steps"]
    total = sum(r["wall_ms"] for r in rows)
    print(f, round(total, 3), file=__import__("sys").stderr)
    if best is None or total < best[0]:
        best = (total, f)
print(best[1])
PY
)
echo "best fold: $best"; export TWINSERVE_DECODE_FOLD=$best
OUT=$O STAGES="offline online16" bash benchmarks/h200_session.sh 2>&1 | grep -E "tok/s|roofline|qwen3-0.6b +16|^ +(1|64|256) " ; t "offline online16"
OUT=$O STAGES="calibrate" bash benchmarks/h200_session.sh 2>&1 | grep -v "^profiled" | tail -25; t calibrate
# the calibration as the plan file (it records its engine's plan): the small step table again
KPLAN=simulator/calibrations/qwen3-0.6b-h200-tp1.json OUT=$O/pinned STAGES="steps_small" bash benchmarks/h200_session.sh 2>&1 | grep -E "^ +(1|16|64) " ; t pinned
cp /tmp/kplan.json $O/; cd /tmp/o && tar -cf - . | xz -T16 -6 > /tmp/final.tar.xz; ls -la /tmp/final.tar.xz; split -b 2800k /tmp/final.tar.xz $OUT/part_; t done
