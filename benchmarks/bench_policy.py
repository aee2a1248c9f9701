"""Policy-layer speed: the scheduler driven by a null executor (no model, no clock).

    python benchmarks/bench_policy.py [--num-requests 10000] [--max-num-seqs 256]

Replays ShareGPT lengths (traces/sharegpt_8k_filtered_stats_llama2_tokenizer.csv) with every
request queued at t=0, prefix caching on, and counts scheduled sequence-steps per wall
second and per CPU second of this process (the box may be shared: read CPU seconds). This
same code is the engine's CPU cost on every step. The garbage collector stays on, as in the
engine. Prints a table and, last, one line of JSON.
"""
import argparse
import cProfile
import csv
import json
import pathlib
import platform
import pstats
import random
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this checkout's policy/, not an installed one

from policy import CacheConfig, Scheduler, SchedulerConfig, Sequence  # noqa: E402

TRACE = ROOT / "traces" / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"


def load_lengths(n: int) -> list[tuple[int, int]]:
    with open(TRACE) as f:
        rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    return rows[:n]


def run(policy: str, lengths, max_num_seqs: int, num_blocks: int, block_size: int, seed: int):
    rng = random.Random(seed)
    sched = Scheduler(SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=8192, max_model_len=10240),
                      CacheConfig(block_size=block_size, enable_prefix_caching=True), num_blocks)
    for i, (p, o) in enumerate(lengths):
        sched.add(Sequence(i, [rng.randrange(32000) for _ in range(p)], o, ignore_eos=True))
    steps = seq_steps = 0
    now = 0.0
    t0, cpu0 = time.perf_counter(), time.process_time()
    while sched.has_unfinished():
        batch = sched.schedule(now)
        now += 0.01
        sched.update(batch, [1] * len(batch.seqs), now)
        steps += 1
        seq_steps += len(batch.seqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"policy": policy, "steps": steps, "seq_steps": seq_steps, "wall_s": wall, "cpu_s": cpu,
            "seq_steps_per_s": seq_steps / wall, "seq_steps_per_cpu_s": seq_steps / cpu,
            "us_per_seq_step": 1e6 * cpu / seq_steps,
            "preemptions": sched.num_preemptions,
            "prefix_hit_rate": sched.block_manager.stats["hit_rate"]}


def steady_decode(num_seqs: int, steps: int) -> dict:
    """The floor: `num_seqs` sequences all decoding, no admission, allocation every 16th
    token. CPU microseconds per scheduled sequence in schedule() and in update()."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=8192,
                                      max_model_len=100_000),
                      CacheConfig(block_size=16), num_blocks=100_000)
    for i in range(num_seqs):
        sched.add(Sequence(i, list(range(i, i + 100)), 50_000, ignore_eos=True))
    batch = sched.schedule(0.0)
    sched.update(batch, [1] * len(batch), 0.0)
    tokens = [1] * num_seqs
    t_sched = t_update = 0.0
    for k in range(steps):
        t0 = time.process_time()
        batch = sched.schedule(float(k))
        t1 = time.process_time()
        sched.update(batch, tokens, float(k))
        t_sched += t1 - t0
        t_update += time.process_time() - t1
    n = steps * num_seqs
    return {"schedule_us": 1e6 * t_sched / n, "update_us": 1e6 * t_update / n,
            "seq_steps_per_s": n / (t_sched + t_update)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--num-blocks", type=int, default=40_000, help="KV pool (blocks)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="cProfile the chunked run")
    args = ap.parse_args()
    lengths = load_lengths(args.num_requests)
    rows = []
    for policy in ("chunked", "prefill_first"):
        if args.profile and policy == "chunked":
            prof = cProfile.Profile()
            prof.enable()
        rows.append(run(policy, lengths, args.max_num_seqs, args.num_blocks, args.block_size, args.seed))
        if args.profile and policy == "chunked":
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    print(f"{len(lengths)} ShareGPT requests, max_num_seqs={args.max_num_seqs}, "
          f"{args.num_blocks} blocks x {args.block_size}, prefix caching on, "
          f"python {platform.python_version()} on {platform.processor() or platform.machine()}")
    print(f"{'policy':<14}{'steps':>9}{'seq-steps':>12}{'wall s':>9}{'CPU s':>8}{'seq-steps/wall s':>18}"
          f"{'seq-steps/CPU s':>17}{'CPU us/seq-step':>17}{'preempt':>9}")
    for r in rows:
        print(f"{r['policy']:<14}{r['steps']:>9}{r['seq_steps']:>12}{r['wall_s']:>9.2f}{r['cpu_s']:>8.2f}"
              f"{r['seq_steps_per_s']:>18,.0f}{r['seq_steps_per_cpu_s']:>17,.0f}"
              f"{r['us_per_seq_step']:>17.3f}{r['preemptions']:>9}")
    steady = steady_decode(args.max_num_seqs, 2000)
    print(f"\nsteady decode, {args.max_num_seqs} sequences x 2000 steps: schedule "
          f"{steady['schedule_us']:.3f} us + update {steady['update_us']:.3f} us per sequence-step "
          f"= {steady['seq_steps_per_s']:,.0f} seq-steps per CPU s")
    print(json.dumps({"bench": "policy", "num_requests": len(lengths), "results": rows,
                      "steady_decode": steady}))


if __name__ == "__main__":
    main()
