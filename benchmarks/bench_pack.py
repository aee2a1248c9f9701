"""Host cost of packing a step: StepPacker.pack (engine/step_inputs.py) on decode-only steps.

    python benchmarks/bench_pack.py [--batches 1,16,64,256] [--steps 2000] [--profile 64]

The real scheduler drives `batch` sequences at a context of ~1k tokens in steady decode
(a block allocated every 16th token), as the engine does with asynchronous scheduling: every
input token is pending on the device, one SamplingParams (temperature 0.6) for all, the
Qwen3-0.6B packer (vocab 151,936, 8 KV heads, 132 SMs) with the decode graphs of
max_num_seqs 256 captured, so the batch is padded to its graph. No model runs: this is the
host work between `schedule` and the upload. Prints the median and p90 microseconds per
pack (wall, on this machine: share the box, read the median), the schedule+update time per
step for scale, and one line of JSON last. `--profile B`: cProfile of the packs at batch B.
"""
import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.kernels.launch import decode_work_capacity, prefill_tile_tokens  # noqa: E402
from policy.decode_plan import DecodePlan  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.step_inputs import StepBuffer, StepPacker  # noqa: E402
from policy import CacheConfig, Scheduler, SchedulerConfig, Sequence  # noqa: E402
from policy.cuda_graphs import decode_sizes  # noqa: E402

VOCAB, KV_HEADS, HEADS, SMS, BLOCK = 151_936, 8, 16, 132, 16
MAX_SEQS, MAX_TOKENS, MAX_LEN = 256, 8192, 4096


def make_packer() -> StepPacker:
    tile = prefill_tile_tokens(HEADS, KV_HEADS, torch.bfloat16)
    max_blocks = -(-MAX_LEN // BLOCK)
    buffer = StepBuffer(MAX_TOKENS, MAX_SEQS, max_blocks, -(-MAX_TOKENS // tile) + MAX_SEQS,
                        decode_work_capacity(MAX_SEQS, DecodePlan(KV_HEADS, SMS)), torch.device("cpu"))
    packer = StepPacker(buffer, BLOCK, max_blocks, MAX_SEQS, VOCAB, tile, DecodePlan(KV_HEADS, SMS))
    packer.decode_sizes = decode_sizes(MAX_SEQS, 512)
    return packer


def run(batch: int, steps: int, context: int, profile: bool) -> dict:
    sched = Scheduler(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=MAX_TOKENS,
                                      max_model_len=MAX_LEN),
                      CacheConfig(block_size=BLOCK), num_blocks=batch * (MAX_LEN // BLOCK) + 16)
    for i in range(batch):
        sched.add(Sequence(i, [(7 * i + j) % 10_000 for j in range(context)], min(steps + 1000, MAX_LEN - context), ignore_eos=True))
    packer = make_packer()
    params = SamplingParams(temperature=0.6)
    b = None
    while b is None or b.num_prefill_tokens or len(b) < batch:   # the prefills, then a decode step
        b = sched.schedule(0.0)
        sched.update(b, [1] * len(b), 0.0)
    pending = {s.seq_id: i for i, s in enumerate(b.seqs)}
    pack_us, policy_us = [], []
    prof = cProfile.Profile() if profile else None
    for k in range(steps):
        t0 = time.perf_counter()
        b = sched.schedule(float(k))
        t1 = time.perf_counter()
        if prof:
            prof.enable()
        step = packer.pack(b, [params] * len(b), pending)
        if prof:
            prof.disable()
        t2 = time.perf_counter()
        pending = {s.seq_id: i for i, s in enumerate(b.seqs)}
        sched.update(b, [1] * len(b), float(k))
        pack_us.append(1e6 * (t2 - t1))
        policy_us.append(1e6 * (t1 - t0 + time.perf_counter() - t2))
        assert step.F == batch and step.graph, (step.F, step.graph, b.num_new_tokens[:4])
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    pack_us.sort()
    return {"batch": batch, "padded": step.B, "pack_us": statistics.median(pack_us),
            "pack_p90_us": pack_us[int(0.9 * len(pack_us))], "policy_us": statistics.median(policy_us)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--profile", type=int, default=0, help="cProfile the packs at this batch")
    args = ap.parse_args()
    rows = [run(int(b), args.steps, args.context, int(b) == args.profile) for b in args.batches.split(",")]
    print(f"StepPacker.pack, decode-only steps at context ~{args.context}, {args.steps} steps each, "
          f"python {platform.python_version()} on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'batch':>6}{'graph':>7}{'pack us (median)':>18}{'p90':>8}{'schedule+update us':>20}")
    for r in rows:
        print(f"{r['batch']:>6}{r['padded']:>7}{r['pack_us']:>18.1f}{r['pack_p90_us']:>8.1f}{r['policy_us']:>20.1f}")
    print(json.dumps({"bench": "pack", "context": args.context, "steps": args.steps, "results": rows}))


if __name__ == "__main__":
    main()
