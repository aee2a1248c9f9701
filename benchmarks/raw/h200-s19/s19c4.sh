#!/usr/bin/env bash
# session 19 call 4 (the nvidia-h200 of calls 1-3): the 48 policy-pair runs of
# Qwen3-0.6B's table at 0.9 x capacity, 3 repeats, with the shipped calibration's kernel plan pinned
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
O=/tmp/o2; mkdir -p $O/fid_q06p; nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $O/gpu.txt
cp build/capacity_q06.json $O/fid_q06p/capacity.json
t0=$(date +%s)
timeout 570 python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b --hardware h200 \
    --calibration simulator/calibrations/qwen3-0.6b-h200-tp1.json --out $O/fid_q06p \
    --traces sharegpt,azure_conv,mooncake_conv --num-requests 100 --repeats 3 --loads 0.9 \
    --pairs policy,budget,block_size,prefix_caching --stages real > $O/fid_pairs_q06.txt 2>&1; echo "pairs rc=$? $(( $(date +%s) - t0 )) s"
tail -3 $O/fid_pairs_q06.txt | cut -c1-300; find $O/fid_q06p/real -name summary.json | wc -l
cd $O && tar -cf - . | xz -T16 -6 > /tmp/c4.tar.xz; split -b 2800k /tmp/c4.tar.xz $OUT/part_; ls -la $OUT
