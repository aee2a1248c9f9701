#!/usr/bin/env bash
# session 13, calls 4 and 5 (run inline right after call 3, the machine still warm; commit 6f875e8)
# call 4: Llama-3.1-8B calibrated on the 1,931-shape grid with the KV blocks in order (kv_layout=contiguous,
# the default since 6f875e8), the shipped kernel plan pinned. Not shipped (see benchmarks/README.md):
# kept as raw/h200-s13/llama-3.1-8b-h200-tp1-contiguous.{json,profile.parquet}
cp simulator/calibrations/llama-3.1-8b-h200-tp1.json /tmp/kplan_l8.json; export TWINSERVE_COMMIT=$(cat build/commit)
KPLAN=/tmp/kplan_l8.json CAL_T=470 STAGES="calibrate_l8" OUT=$OUT bash benchmarks/h200_session.sh
# call 5: the policy pairs of Qwen3-0.6B's table at 0.9 x capacity (session 11's capacity.json), 3 repeats
export PYTHONPATH=/tmp/site:$PWD TWINSERVE_COMMIT=$(cat build/commit)
mkdir -p /tmp/o/fid_q06p && cp benchmarks/fidelity/results/qwen3-0.6b-h200-s11/capacity.json /tmp/o/fid_q06p/
timeout 465 python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b --hardware h200 \
    --calibration simulator/calibrations/qwen3-0.6b-h200-tp1.json --out /tmp/o/fid_q06p \
    --traces sharegpt,azure_conv,mooncake_conv --num-requests 100 --repeats 3 --loads 0.9 \
    --pairs policy,budget,block_size,prefix_caching --stages real > $OUT/fid_pairs_q06.txt 2>&1
