"""Where a decode step's GPU time goes: torch.profiler over CUDA-graph decode steps.

    python benchmarks/profile_decode.py --model DIR [--batch 256] [--context 1024]

Runs `batch` requests of `context` prompt tokens, then profiles 8 pure-decode steps and
prints the kernels by total GPU time, plus kernels launched per step, and the load-time
skinny-GEMM choice of the LM head (cuBLAS vs the kernel per row count, with or without PDL as
timed; which one a step of this batch runs is in the kernel list). One line of JSON last.
"""
import argparse
import json
import os
import statistics
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLMEngine, SamplingParams  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--pdl-max-tokens", type=int, default=32, help="EngineConfig.pdl_max_tokens (0: no PDL, A/B)")
    ap.add_argument("--top", type=int, default=18, help="kernels listed (by GPU time)")
    ap.add_argument("--timeline", type=int, default=40, help="kernels of the last step listed in launch order")
    args = ap.parse_args()
    engine = LLMEngine(args.model, max_model_len=args.max_model_len, max_num_batched_tokens=16384,
                       pdl_max_tokens=args.pdl_max_tokens)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=64)
    for i in range(args.batch):
        engine.add_request([(7 * i + j) % 10000 for j in range(args.context)], params)
    while engine.step_records == [] or engine.step_records[-1]["num_prefill_tokens"]:
        engine.step()                      # prefill, then the first pure decode
    for _ in range(8):
        engine.step()                      # warm; also the wall time per step (outside the profiler)
    wall_ms = statistics.median(1e3 * r["duration_s"] for r in engine.step_records[-6:])
    steps = 8
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    rows = sorted(((e.key, e.count, getattr(e, "self_device_time_total", 0.0)) for e in prof.key_averages()),
                  key=lambda r: -r[2])
    total_us = sum(r[2] for r in rows) or float("nan")
    launches = sum(r[1] for r in rows if r[2] > 0)
    recs = engine.step_records[-steps:]
    print(f"decode batch {args.batch}, context ~{args.context}: GPU {total_us / steps / 1e3:.3f} ms/step in kernels, "
          f"{launches / steps:.0f} kernels/step; step {wall_ms:.3f} ms wall (median), so "
          f"{1e3 * (wall_ms - total_us / steps / 1e3) / max(launches / steps, 1):.2f} us between kernels on average")
    print(f"{'kernel':<70} {'calls/step':>10} {'us/step':>9} {'%':>6}")
    for key, count, us in rows[:args.top]:
        print(f"{key[:70]:<70} {count / steps:>10.1f} {us / steps:>9.1f} {100 * us / total_us:>5.1f}%")
    timeline = step_timeline(prof, round(launches / steps))
    if timeline:
        gaps = sum(g for _, _, g in timeline)
        busy = sum(d for _, d, _ in timeline)
        print(f"\nthe last step's kernels in launch order: {len(timeline)} kernels, {busy:.1f} us busy, "
              f"{gaps:.1f} us idle between them (us; the first {args.timeline} shown)")
        print(f"{'#':>4} {'kernel':<64} {'us':>7} {'gap us':>7}")
        for i, (name, dur, gap) in enumerate(timeline[:args.timeline]):
            print(f"{i:>4} {name[:64]:<64} {dur:>7.1f} {gap:>7.1f}")
    head = lm_head_choice(engine)
    if head:
        print("\nLM head, load-time choice (engine.kernels.skinny_gemm.choose_skinny_gemm): us per call")
        print(f"{'M':>4} {'pdl':>5} {'cuBLAS':>8} {'kernel':>8} {'split':>5}  chosen")
        for r in head:
            print(f"{r['m']:>4} {str(r.get('pdl', '-')):>5} {r['torch_us']:>8.1f} {r['triton_us']:>8.1f} "
                  f"{r['split_k']:>5}  {'kernel' if r['skinny'] else 'cuBLAS'}")
    print(json.dumps({"bench": "profile_decode", "batch": args.batch, "context": args.context,
                      "gpu_ms_per_step": total_us / steps / 1e3, "wall_ms": wall_ms, "kernels_per_step": launches / steps,
                      "step_ms": [1e3 * r["duration_s"] for r in recs], "cpu_ms": [1e3 * r["cpu_s"] for r in recs],
                      "top": [[k, c / steps, us / steps] for k, c, us in rows[:args.top]],
                      "timeline": timeline, "lm_head_choice": head}))


def lm_head_choice(engine):
    """The skinny-GEMM report's rows of the widest layer shape (the LM head's vocabulary)."""
    report = getattr(getattr(engine, "model_runner", None), "skinny_report", None) or []
    widest = max((r["n"] for r in report), default=None)
    return [r for r in report if r["n"] == widest]


def step_timeline(prof, per_step):
    """The last `per_step` device kernels in start order: (name, duration us, idle us before it)."""
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.elapsed_us() > 0
                      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                     key=lambda e: e.time_range.start)[-per_step:]
    out, prev_end = [], None
    for e in kernels:
        gap = 0.0 if prev_end is None else max(0.0, e.time_range.start - prev_end)
        out.append((e.name, e.time_range.elapsed_us(), gap))
        prev_end = e.time_range.end
    return out


if __name__ == "__main__":
    main()
