"""Simulator speed: ShareGPT requests near capacity, qwen3-0.6b on h100, roofline cost model.

    python benchmarks/bench_simulator.py [--num-requests 10000] [--rate R] [--profile]
        [--steps-out steps.parquet]

First a saturation probe: the first `--probe-requests` requests all arrive at t=0 (a full
queue keeps the engine at max_num_seqs); saturation = probe requests / simulated duration.
The timed run then replays `--num-requests` requests with Poisson arrivals at
`--load` x saturation (0.9 by default; `--rate` sets it directly). Reports simulated and
wall seconds, simulated requests and steps per wall second. `--profile` prints cProfile's
top 20 functions of the timed run. Prints a table and, last, one line of JSON.
"""
import argparse
import cProfile
import json
import pathlib
import platform
import pstats
import sys
import time

import pandas as pd
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policy import CacheConfig, SchedulerConfig  # noqa: E402
from simulator import (CostModelConfig, HardwareSpec, ModelSpec, Simulator,  # noqa: E402
                       build_cost_model, kv_pool_blocks)
from traces import TraceConfig, load_trace, materialize  # noqa: E402


def requests_for(num_requests: int, arrival: str, rate: float, max_model_len: int,
                 block_size: int, vocab_size: int):
    df = load_trace(TraceConfig(name="sharegpt", num_requests=num_requests, arrival=arrival,
                                request_rate=rate, max_total_len=max_model_len, seed=0))
    return materialize(df, block_size=block_size, vocab_size=vocab_size, seed=0)


def simulate(sim: Simulator, requests, profile: bool = False) -> dict:
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    result = sim.run(requests)
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    steps = pd.DataFrame(result.steps)
    seq_steps = int(steps["num_seqs"].sum())
    n = len(requests)
    return {"requests": n, "sim_s": result.duration_s, "wall_s": result.wall_s,
            "sim_req_per_wall_s": n / result.wall_s, "steps": len(steps),
            "steps_per_wall_s": len(steps) / result.wall_s, "seq_steps": seq_steps,
            "us_per_seq_step": 1e6 * result.wall_s / seq_steps,
            "sim_req_per_s": n / result.duration_s,
            "sim_output_tok_per_s": sum(r.output_len for r in requests) / result.duration_s,
            "preemptions": int(steps["num_preempted"].sum()),
            "prefix_hit_rate": result.cache_stats[0]["hit_rate"], "_steps": steps}


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
    ap.add_argument("--profile", action="store_true", help="cProfile the timed run (top 20)")
    ap.add_argument("--steps-out", default=None, help="write the timed run's steps here (parquet)")
    args = ap.parse_args()

    model_cfg = yaml.safe_load(open(ROOT / "conf" / "model" / f"{args.model}.yaml"))
    model = ModelSpec.from_hf_config(model_cfg["hf_config"], name=model_cfg["name"])
    hw = HardwareSpec(**yaml.safe_load(open(ROOT / "conf" / "hardware" / f"{args.hardware}.yaml")))
    num_blocks = kv_pool_blocks(model, hw, args.block_size, args.gpu_memory_utilization)
    sched_cfg = SchedulerConfig(policy="chunked", max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=args.max_num_batched_tokens,
                                max_model_len=args.max_model_len)
    cache_cfg = CacheConfig(block_size=args.block_size, enable_prefix_caching=True)
    sim = Simulator(sched_cfg, cache_cfg, build_cost_model(CostModelConfig(), model, hw), num_blocks)
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
    main_run = simulate(sim, requests, profile=args.profile)
    rows.append({"run": f"poisson {rate:.2f} req/s", **main_run})
    if args.steps_out:
        main_run["_steps"].to_parquet(args.steps_out)

    print(f"ShareGPT lengths, {args.model} on {args.hardware} (roofline), {num_blocks} KV blocks x "
          f"{args.block_size}, chunked, max_num_seqs={args.max_num_seqs}, "
          f"python {platform.python_version()} on {platform.processor() or platform.machine()}")
    print(f"Poisson rate {rate:.2f} req/s = "
          + (f"{args.load} x saturation" if args.rate is None else "--rate")
          + f"; trace load + token materialization {materialize_s:.1f} s (not timed)")
    header = (f"{'run':<26}{'requests':>9}{'sim s':>9}{'wall s':>8}{'sim req/wall s':>16}"
              f"{'steps':>8}{'steps/wall s':>14}{'us/seq-step':>13}{'sim req/s':>11}{'preempt':>9}")
    print(header)
    for r in rows:
        print(f"{r['run']:<26}{r['requests']:>9}{r['sim_s']:>9.1f}{r['wall_s']:>8.2f}"
              f"{r['sim_req_per_wall_s']:>16,.0f}{r['steps']:>8}{r['steps_per_wall_s']:>14,.0f}"
              f"{r['us_per_seq_step']:>13.2f}{r['sim_req_per_s']:>11.2f}{r['preemptions']:>9}")
    results = [{k: v for k, v in r.items() if k != "_steps"} for r in rows]
    print(json.dumps({"bench": "simulator", "model": args.model, "hardware": args.hardware,
                      "num_blocks": num_blocks, "rate": rate, "results": results}))


if __name__ == "__main__":
    main()
