"""Where a decode step's GPU time goes: torch.profiler over CUDA-graph decode steps.

    python benchmarks/profile_decode.py --model DIR [--batch 256] [--context 1024]

Runs `batch` requests of `context` prompt tokens, then profiles 8 pure-decode steps and
prints the kernels by total GPU time, plus kernels launched per step. One line of JSON last.
"""
import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLMEngine, SamplingParams  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args()
    engine = LLMEngine(args.model, max_model_len=args.max_model_len, max_num_batched_tokens=16384)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=64)
    for i in range(args.batch):
        engine.add_request([(7 * i + j) % 10000 for j in range(args.context)], params)
    while engine.step_records == [] or engine.step_records[-1]["num_prefill_tokens"]:
        engine.step()                      # prefill, then the first pure decode
    for _ in range(4):
        engine.step()                      # warm
    steps = 8
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.count, getattr(e, "self_device_time_total", 0.0)) for e in prof.key_averages()),
                  key=lambda r: -r[2])
    total_us = sum(r[2] for r in rows) or float("nan")
    launches = sum(r[1] for r in rows if r[2] > 0)
    print(f"decode batch {args.batch}, context ~{args.context}: GPU {total_us / steps / 1e3:.3f} ms/step, "
          f"{launches / steps:.0f} kernels/step")
    print(f"{'kernel':<70} {'calls/step':>10} {'us/step':>9} {'%':>6}")
    for key, count, us in rows[:18]:
        print(f"{key[:70]:<70} {count / steps:>10.1f} {us / steps:>9.1f} {100 * us / total_us:>5.1f}%")
    recs = engine.step_records[-steps:]
    print(json.dumps({"bench": "profile_decode", "batch": args.batch, "context": args.context,
                      "gpu_ms_per_step": total_us / steps / 1e3, "kernels_per_step": launches / steps,
                      "step_ms": [1e3 * r["duration_s"] for r in recs], "cpu_ms": [1e3 * r["cpu_s"] for r in recs],
                      "top": [[k, c / steps, us / steps] for k, c, us in rows[:18]]}))


if __name__ == "__main__":
    main()
