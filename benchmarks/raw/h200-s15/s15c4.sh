#!/usr/bin/env bash
# session 15 call 4 (nvidia-h200, the budget's last 170 s): Llama-3.1-8B's prompt step with the
# profile's all-zero token ids against random ones (probe_transitions.py --stages tokens)
set -u
export PYTHONUNBUFFERED=1
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader
timeout ${T:-140} python3 benchmarks/probe_transitions.py --model llama-3.1-8b --stages tokens --decodes 8 --chunk 2048,512 --run 16 --burst 12 2>&1 | grep -v "random weights" | tail -12
