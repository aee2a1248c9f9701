"""Simulator speed: ShareGPT requests near capacity, qwen3-0.6b on h100, roofline cost model.

    python benchmarks/bench_simulator.py [--num-requests 10000] [--rate R] [--no-breakdown]
        [--step-by-step] [--no-prefix-caching] [--no-deferral] [--profile] [--steps-out steps.parquet]

First a saturation probe: the first `--probe-requests` requests all arrive at t=0 (a full
queue keeps the engine at max_num_seqs); saturation = probe requests / simulated duration.
The timed run then replays `--num-requests` requests with Poisson arrivals at
`--load` x saturation (0.9 by default; `--rate` sets it directly). Reports simulated
requests per wall second and per CPU second of this process (the box may be shared: read
CPU seconds), steps, loop iterations and the event-skipping factor (steps simulated per
loop iteration). Then, unless `--no-breakdown`, the timed run once more under cProfile:
the share of its time per component (scheduler, block manager, step loop, cost model,
simpy, garbage collector...). `--step-by-step` runs the reference loop (one iteration per
step) instead of event skipping. `--no-prefix-caching` runs without block hashing and the
prefix cache: the same schedule on this trace (it has no prefix hits), so the difference
is what hashing and the cache cost. `--no-deferral` hashes and enters every full block when
it is registered (policy.block_manager's deferred registration off): the same result, so
the difference is what deferral saves. `--profile` prints cProfile's top 20 functions.
Prints tables and, last, one line of JSON.
"""
import argparse
import cProfile
import gc
import json
import pathlib
import platform
import pstats
import sys
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policy import BlockManager, CacheConfig, SchedulerConfig  # noqa: E402
from simulator import (CostModelConfig, HardwareSpec, ModelSpec, Simulator,  # noqa: E402
                       build_cost_model, kv_pool_blocks)
from traces import TraceConfig, load_trace, materialize  # noqa: E402

# Where the time of a run goes: a profiled function's file (or, for a C function, its
# caller's file) names its component.
COMPONENTS = (("policy/scheduler.py", "scheduler"), ("policy/block_manager.py", "block manager"),
              ("policy/batch.py", "batch features"), ("policy/sequence.py", "scheduler"),
              ("policy/fast_forward.py", "event skipping"), ("simulator/fast_forward.py", "event skipping"),
              ("simulator/sim.py", "step loop"),
              ("simulator/cluster.py", "step loop"), ("simulator/cost_model.py", "cost model"),
              ("simulator/hardware.py", "cost model"), ("policy/cuda_graphs.py", "cost model"),
              ("simpy", "simpy"), ("numpy", "numpy"))


def requests_for(num_requests: int, arrival: str, rate: float, max_model_len: int,
                 block_size: int, vocab_size: int):
    df = load_trace(TraceConfig(name="sharegpt", num_requests=num_requests, arrival=arrival,
                                request_rate=rate, max_total_len=max_model_len, seed=0))
    return materialize(df, block_size=block_size, vocab_size=vocab_size, seed=0)


def component_of(filename: str) -> str | None:
    for key, name in COMPONENTS:
        if key in filename:
            return name
    return None


def component_shares(prof: cProfile.Profile, gc_s: float) -> dict[str, float]:
    """Seconds per component from a profile: each function's own time goes to its file's
    component; a C function's (list.append, xxhash...) to its callers', split as they
    called it. `gc_s`, the collector's time, is its own component."""
    seconds: dict[str, float] = {}
    stats = pstats.Stats(prof).stats
    for (filename, _, _), (_, _, tottime, _, callers) in stats.items():
        name = component_of(filename)
        if name is None and filename == "~" and callers:   # a C function: bill its callers
            total = sum(edge[2] for edge in callers.values()) or 1.0
            for (caller_file, _, _), edge in callers.items():
                caller = component_of(caller_file) or "other"
                seconds[caller] = seconds.get(caller, 0.0) + tottime * edge[2] / total
            continue
        seconds[name or "other"] = seconds.get(name or "other", 0.0) + tottime
    seconds["garbage collector"] = gc_s
    return seconds


class GcTimer:
    """CPU seconds spent in the cyclic garbage collector while installed."""

    def __init__(self):
        self.seconds, self._start = 0.0, 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.process_time()
        else:
            self.seconds += time.process_time() - self._start

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def simulate(sim: Simulator, requests, profile: bool = False) -> dict:
    prof = cProfile.Profile() if profile else None
    with GcTimer() as gc_timer:
        cpu0 = time.process_time()
        if prof:
            prof.enable()
        result = sim.run(requests)
        if prof:
            prof.disable()
        cpu_s = time.process_time() - cpu0
    steps = result.steps
    seq_steps = sum(step["num_seqs"] for step in steps)
    n = len(requests)
    return {"requests": n, "sim_s": result.duration_s, "wall_s": result.wall_s, "cpu_s": cpu_s,
            "sim_req_per_wall_s": n / result.wall_s, "sim_req_per_cpu_s": n / cpu_s,
            "steps": len(steps), "iterations": result.num_iterations,
            "skip_factor": len(steps) / max(1, result.num_iterations),
            "steps_per_cpu_s": len(steps) / cpu_s, "seq_steps": seq_steps,
            "us_per_seq_step": 1e6 * cpu_s / seq_steps,
            "sim_req_per_s": n / result.duration_s,
            "sim_output_tok_per_s": sum(r.output_len for r in requests) / result.duration_s,
            "preemptions": sum(step["num_preempted"] for step in steps), "gc_s": gc_timer.seconds,
            "prefix_hit_rate": result.cache_stats[0]["hit_rate"], "_steps": steps, "_prof": prof}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--probe-requests", type=int, default=2_000, help="saturation probe size")
    ap.add_argument("--load", type=float, default=0.9, help="Poisson rate / saturation rate")
    ap.add_argument("--rate", type=float, default=None, help="Poisson rate (req/s); skips the probe")
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--hardware", default="h100")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=10240)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="no block hashing or prefix cache (what they cost: this trace has no hits)")
    ap.add_argument("--no-deferral", action="store_true",
                    help="hash and enter every full block at once (what deferred registration saves)")
    ap.add_argument("--step-by-step", action="store_true",
                    help="the reference loop: one iteration per step, no event skipping")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the profiled breakdown run")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top 20 functions")
    ap.add_argument("--steps-out", default=None, help="write the timed run's steps here (parquet)")
    args = ap.parse_args()
    BlockManager.defer_registration = not args.no_deferral

    model_cfg = yaml.safe_load(open(ROOT / "conf" / "model" / f"{args.model}.yaml"))
    model = ModelSpec.from_hf_config(model_cfg["hf_config"], name=model_cfg["name"])
    hw = HardwareSpec(**yaml.safe_load(open(ROOT / "conf" / "hardware" / f"{args.hardware}.yaml")))
    num_blocks = kv_pool_blocks(model, hw, args.block_size, args.gpu_memory_utilization)
    sched_cfg = SchedulerConfig(policy="chunked", max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=args.max_num_batched_tokens,
                                max_model_len=args.max_model_len)
    cache_cfg = CacheConfig(block_size=args.block_size, enable_prefix_caching=not args.no_prefix_caching)
    sim = Simulator(sched_cfg, cache_cfg, build_cost_model(CostModelConfig(), model, hw), num_blocks,
                    event_skipping=not args.step_by_step)
    build = lambda n, arrival, rate: requests_for(n, arrival, rate, args.max_model_len,  # noqa: E731
                                                  args.block_size, model.vocab_size)

    rows = []
    rate = args.rate
    if rate is None:
        probe = simulate(sim, build(args.probe_requests, "burst", 1.0))
        rows.append({"run": "saturation probe (burst)", **probe})
        rate = args.load * probe["sim_req_per_s"]
    t0 = time.perf_counter()
    requests = build(args.num_requests, "poisson", rate)
    materialize_s = time.perf_counter() - t0
    main_run = simulate(sim, requests)
    rows.append({"run": f"poisson {rate:.2f} req/s", **main_run})
    if args.steps_out:
        import pandas as pd
        pd.DataFrame(main_run["_steps"]).to_parquet(args.steps_out)
    breakdown = None
    if not args.no_breakdown or args.profile:
        profiled = simulate(sim, requests, profile=True)
        breakdown = component_shares(profiled["_prof"], profiled["gc_s"])
        if args.profile:
            pstats.Stats(profiled["_prof"]).sort_stats("tottime").print_stats(20)

    loop = "step by step" if args.step_by_step else "event skipping"
    if args.no_prefix_caching:
        loop += ", no prefix caching"
    elif args.no_deferral:
        loop += ", no deferred registration"
    print(f"ShareGPT lengths, {args.model} on {args.hardware} (roofline), {num_blocks} KV blocks x "
          f"{args.block_size}, chunked, max_num_seqs={args.max_num_seqs}, {loop}, "
          f"python {platform.python_version()} on {platform.processor() or platform.machine()}")
    print(f"Poisson rate {rate:.2f} req/s = "
          + (f"{args.load} x saturation" if args.rate is None else "--rate")
          + f"; trace load + token materialization {materialize_s:.1f} s wall (not timed)")
    print(f"{'run':<26}{'requests':>9}{'sim s':>8}{'wall s':>8}{'CPU s':>7}{'req/wall s':>11}"
          f"{'req/CPU s':>10}{'steps':>8}{'iters':>8}{'skip':>6}{'us/seq-step':>12}{'sim req/s':>10}"
          f"{'preempt':>8}")
    for r in rows:
        print(f"{r['run']:<26}{r['requests']:>9}{r['sim_s']:>8.1f}{r['wall_s']:>8.2f}{r['cpu_s']:>7.2f}"
              f"{r['sim_req_per_wall_s']:>11,.0f}{r['sim_req_per_cpu_s']:>10,.0f}{r['steps']:>8}"
              f"{r['iterations']:>8}{r['skip_factor']:>6.1f}{r['us_per_seq_step']:>12.3f}"
              f"{r['sim_req_per_s']:>10.2f}{r['preemptions']:>8}")
    if breakdown:
        total = sum(breakdown.values())
        print(f"\nwhere the timed run's time goes (cProfile, {total:.2f} s profiled):")
        for name, seconds in sorted(breakdown.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<20}{100 * seconds / total:>6.1f}%")
    results = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    print(json.dumps({"bench": "simulator", "model": args.model, "hardware": args.hardware,
                      "num_blocks": num_blocks, "rate": rate,
                      "results": results,
                      "breakdown_share": {k: v / sum(breakdown.values()) for k, v in breakdown.items()}
                      if breakdown else None}))


if __name__ == "__main__":
    main()
