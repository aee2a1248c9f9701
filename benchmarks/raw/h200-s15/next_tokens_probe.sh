#!/usr/bin/env bash
# For the next device session, first call (~130 s with a cold start): does Llama-3.1-8B's prompt
# step run slower with random token ids than with the profile's all-zero ones? Then
# s15c1.sh (calibrate; calibrate.token_ids=random is now the default) and s15c2.sh twice
# (the 36 table runs on that machine), ~1,700 s in all. Run from the repository root with
# .whl/ and build/ carried (build/commit: git rev-parse --short HEAD).
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader
timeout ${T:-140} python3 benchmarks/probe_transitions.py --model llama-3.1-8b --stages tokens --decodes 8 \
    --chunk 2048,512 --run 16 --burst 12 2>&1 | grep -v "random weights" | tail -12
