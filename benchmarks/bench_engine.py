"""Engine throughput on nano-vLLM's bench.py workload, plus a decode-step breakdown.

    python benchmarks/bench_engine.py                      # qwen3-0.6b, random weights, CUDA
    python benchmarks/bench_engine.py --model /path/to/ckpt --block-size 256 --tp 2
    python benchmarks/bench_engine.py --smoke              # tiny model on the CPU: it runs

The workload is nano-vLLM's, draw for draw: random.seed(0); first every prompt
([randint(0, 10000) for _ in range(randint(100, 1024))], 256 of them), then every
SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, 1024)); that is
133,966 output tokens. Throughput = output tokens / wall time of one generate() call after a
warm-up, as nano-vLLM reports it. Then, per decode batch size (1, 64, 256), the median
decode step: its wall time, its device time (CUDA events), the host's work on it
(scheduling, packing, launch, update) and the part of that work the device waited for
(the gap between the previous step's end and this step's start: with asynchronous
scheduling the rest of the host's work hides behind the device). Prints tables, then one
line of JSON.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from random import randint, seed

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402

NANO_OUTPUT_TOKENS = 133_966     # nano-vLLM README: 256 seqs, seed 0


def nano_workload(num_seqs: int, max_input_len: int, max_output_len: int):
    """nano-vLLM bench.py's requests, in its draw order (prompts first, then params)."""
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, max_input_len))]
               for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_output_len))
              for _ in range(num_seqs)]
    return prompts, params


def decode_breakdown(llm: LLM, batch: int, context: int, steps: int) -> dict:
    """Median decode-only step with all `batch` sequences (~`context` tokens each) decoding:
    wall, device, host-work and gap (device idle, waiting for the host) milliseconds. The
    requests run long enough to outlast the prefill steps, so `steps` pure decode steps of
    the full batch occur."""
    budget = llm.config.max_num_batched_tokens
    prefill_steps = -(-batch * context // budget) + 1
    start = len(llm.step_records)
    prompts = [[(7 * i + j) % 10000 for j in range(context)] for i in range(batch)]
    llm.generate(prompts, SamplingParams(temperature=0.6, ignore_eos=True,
                                         max_tokens=prefill_steps + steps), use_tqdm=False)
    rows = [r for r in llm.step_records[start:]
            if r["num_prefill_tokens"] == 0 and r["num_seqs"] == batch]
    if not rows:
        return {"batch": batch, "steps": 0}
    median_ms = lambda key: statistics.median(r[key] for r in rows) * 1e3  # noqa: E731
    step_ms, gap_ms = median_ms("duration_s"), median_ms("gpu_gap_s")
    return {"batch": batch, "steps": len(rows), "step_ms": step_ms, "cpu_ms": median_ms("cpu_s"),
            "device_ms": median_ms("device_s"), "gap_ms": gap_ms, "gap_share": gap_ms / step_ms,
            "tok_per_s": batch / step_ms * 1e3}


def run_breakdown(steps: list[dict], wall_s: float) -> list[dict]:
    """Where the timed run's wall time went: steps grouped by kind (any prefill tokens, or
    decode-only by batch size), each with its wall, device, host-work (cpu_s) and gap
    (device idle, waiting for the host) seconds; plus the time outside steps."""
    edges = (1, 8, 32, 64, 128, 256, 1 << 30)

    def bucket(r) -> int:   # 0 = any prefill tokens, else the decode batch-size bucket's top
        return 0 if r["num_prefill_tokens"] else min(e for e in edges if e >= r["num_seqs"])

    def label(top: int) -> str:
        if top == 0:
            return "prefill/mixed"
        low = max((e for e in edges if e < top), default=0) + 1
        return f"decode B={top}" if low == top else f"decode B={low}-{top}"

    groups: dict[int, list[dict]] = {}
    for r in steps:
        groups.setdefault(bucket(r), []).append(r)
    rows = []
    for top in sorted(groups):
        rs = groups[top]
        wall = sum(r["duration_s"] for r in rs)
        rows.append({"kind": label(top), "steps": len(rs), "wall_s": wall,
                     "device_s": sum(r["device_s"] for r in rs),
                     "host_s": sum(r["cpu_s"] for r in rs),
                     "gap_s": sum(r["gpu_gap_s"] for r in rs), "ms_per_step": 1e3 * wall / len(rs),
                     "max_ms": 1e3 * max(r["duration_s"] for r in rs),
                     "tokens": sum(r["num_batched_tokens"] for r in rs)})
    outside = wall_s - sum(r["duration_s"] for r in steps)
    rows.append({"kind": "outside steps", "steps": 0, "wall_s": outside, "host_s": outside,
                 "device_s": 0.0, "gap_s": float("nan"), "ms_per_step": float("nan"), "max_ms": float("nan"), "tokens": 0})
    return rows


def checkpoint(model: str, dtype: str) -> str:
    """`model` if it is a model directory; else a random-weight checkpoint of that conf/model
    name (or "tiny-qwen3") in the temp folder, written once and reused."""
    if os.path.isdir(model):
        return model
    path = os.path.join(tempfile.gettempdir(), f"twinserve-{model}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        config = tiny_config("qwen3", vocab_size=10240) if model == "tiny-qwen3" else model
        print(f"writing random checkpoint {model} -> {path}", file=sys.stderr, flush=True)
        write_random_checkpoint(config, path, dtype=dtype)
    return path


def copy_bandwidth() -> float:
    """Measured HBM ceiling: a 1 GiB device-to-device copy, bytes read + written / median time."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times[5:])


def hbm_floor_s(prompts, params, weight_bytes: int, kv_bytes_per_token: int, bandwidth: float) -> float:
    """The workload's HBM floor: every decode step reads the weights once (at least as many
    steps as the longest output), and every generated token's step reads its sequence's
    whole KV cache (prompt + tokens so far)."""
    steps = max(p.max_tokens for p in params)
    kv_tokens = sum(len(x) * p.max_tokens + p.max_tokens * (p.max_tokens - 1) // 2
                    for x, p in zip(prompts, params))
    return (steps * weight_bytes + kv_tokens * kv_bytes_per_token) / bandwidth


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b",
                    help="model directory, or a conf/model name (a random checkpoint is written)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--backend", default="auto", help="attention backend")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--pdl-max-tokens", type=int, default=32, help="EngineConfig.pdl_max_tokens (0: no PDL, A/B)")
    ap.add_argument("--kernel-plan", help="EngineConfig.kernel_plan: a file pinning the skinny-GEMM choice "
                    "(written by the first run that names it, read by the others: A/B runs on one kernel plan)")
    ap.add_argument("--graph-max-tokens", type=int, default=8192, help="cuda_graph_max_tokens: largest step replayed from a CUDA graph")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--decode-batches", default="1,64,256")
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--steps-csv", help="write the timed run's per-step records here")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="after the timed run, run the workload again under cProfile and "
                         "print the N functions with the most own time (host hot spots)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 8 short requests, CPU if no GPU: proves the script runs")
    args = ap.parse_args()

    extra = {}
    if args.smoke:
        args.num_seqs, args.max_input_len, args.max_output_len = 8, 120, 110
        args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens = 256, 8, 512
        args.decode_batches, args.decode_context = "1,4", 32
        if args.model == "qwen3-0.6b":
            args.model = "tiny-qwen3"
        if not torch.cuda.is_available():
            extra = dict(device="cpu", dtype="float32", num_gpu_blocks=256)
    path = checkpoint(args.model, "float32" if extra else "bfloat16")

    llm = LLM(path, block_size=args.block_size, attention_backend=args.backend,
              enforce_eager=args.enforce_eager, pdl_max_tokens=args.pdl_max_tokens, cuda_graph_max_tokens=args.graph_max_tokens, tensor_parallel_size=args.tp, kernel_plan=args.kernel_plan,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, **extra)
    prompts, params = nano_workload(args.num_seqs, args.max_input_len, args.max_output_len)
    output_tokens = sum(p.max_tokens for p in params)
    if (args.num_seqs, args.max_input_len, args.max_output_len) == (256, 1024, 1024):
        assert output_tokens == NANO_OUTPUT_TOKENS, output_tokens

    # Warm-up on a slice of the workload: Triton and torch.compile variants of the mixed
    # (eager) and decode (graph) steps are built here, not in the timed run.
    llm.generate(prompts[:32], SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=8),
                 use_tqdm=False)
    first_step = len(llm.step_records)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    assert sum(len(o.token_ids) for o in outs) == output_tokens
    steps = llm.step_records[first_step:]
    cpu_share = sum(r["cpu_s"] for r in steps) / seconds       # host work / wall
    gap_share = sum(r["gpu_gap_s"] for r in steps) / seconds   # device idle, waiting for the host
    device_share = sum(r["device_s"] for r in steps) / seconds
    phases = run_breakdown(steps, seconds)
    if args.steps_csv:
        import pandas as pd
        pd.DataFrame(steps).to_csv(args.steps_csv, index=False)
    if args.cprofile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.enable()
        llm.generate(prompts, params, use_tqdm=False)
        profiler.disable()
        print(f"\nhost profile of a second run (cProfile, top {args.cprofile} by own time):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)

    cuda = torch.cuda.is_available() and not extra
    runner = llm.model_runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_per_token = sum(layer.k_cache[0, 0].numel() * 2 * layer.k_cache.element_size()
                       for layer in runner.model.attention_layers())
    ceiling = copy_bandwidth() if cuda else float("nan")
    floor_s = hbm_floor_s(prompts, params, weight_bytes, kv_per_token, ceiling)
    breakdown = [decode_breakdown(llm, b, args.decode_context, 16)
                 for b in map(int, args.decode_batches.split(","))
                 if b <= args.max_num_seqs]
    llm.close()

    device = torch.cuda.get_device_name() if cuda else "cpu"
    for b in breakdown:    # achieved bandwidth of the decode step's device time
        if b["steps"]:
            nbytes = weight_bytes + kv_per_token * b["batch"] * args.decode_context
            b["device_GBps"] = nbytes / (b["device_ms"] / 1e3) / 1e9     # device time (events)
            b["pct_of_copy"] = 100 * nbytes / (b["device_ms"] / 1e3) / ceiling
    print(f"\nnano-vLLM bench workload on {device}: {args.model}, block {args.block_size}, "
          f"backend {args.backend}, tp {args.tp}, eager {args.enforce_eager}, graph max tokens {args.graph_max_tokens}, "
          f"KV pool {llm.model_runner.num_blocks} blocks")
    print(f"weights {weight_bytes / 1e9:.2f} GB, KV {kv_per_token / 1024:.0f} KiB/token, "
          f"copy ceiling {ceiling / 1e9:.0f} GB/s -> HBM floor {floor_s:.2f} s = "
          f"{output_tokens / floor_s:,.0f} tok/s")
    print(f"{'requests':>10} {'output tokens':>14} {'time (s)':>10} {'tok/s':>10} {'% roofline':>11} "
          f"{'steps':>7} {'device %':>9} {'host work %':>12} {'device idle %':>14}")
    print(f"{args.num_seqs:>10} {output_tokens:>14,} {seconds:>10.2f} {output_tokens / seconds:>10.1f} "
          f"{100 * floor_s / seconds:>10.1f}% {len(steps):>7} {100 * device_share:>8.1f}% "
          f"{100 * cpu_share:>11.1f}% {100 * gap_share:>13.1f}%")
    print(f"\nwhere the timed run went ({seconds:.2f} s):")
    print(f"{'steps':>22} {'count':>6} {'wall s':>8} {'device s':>9} {'host work s':>12} {'idle s':>7} "
          f"{'ms/step':>8} {'max ms':>8} {'tokens':>9}")
    for p in phases:
        print(f"{p['kind']:>22} {p['steps']:>6} {p['wall_s']:>8.3f} {p['device_s']:>9.3f} "
              f"{p['host_s']:>12.3f} {p['gap_s']:>7.3f} {p['ms_per_step']:>8.3f} {p['max_ms']:>8.1f} {p['tokens']:>9,}")
    print(f"\ndecode step at context ~{args.decode_context} (median):")
    print(f"{'batch':>6} {'step ms':>9} {'device ms':>10} {'host work ms':>13} {'idle ms':>8} {'idle %':>7} {'tok/s':>10} "
          f"{'dev GB/s':>9} {'% copy':>7}")
    for b in breakdown:
        if b["steps"]:
            print(f"{b['batch']:>6} {b['step_ms']:>9.3f} {b['device_ms']:>10.3f} {b['cpu_ms']:>13.3f} "
                  f"{b['gap_ms']:>8.3f} {100 * b['gap_share']:>6.1f}% {b['tok_per_s']:>10.1f} "
                  f"{b.get('device_GBps', float('nan')):>9.0f} {b.get('pct_of_copy', float('nan')):>6.1f}%")
    result = {"bench": "engine", "workload": "nano-vllm", "model": args.model, "device": device,
              "block_size": args.block_size, "backend": args.backend, "tp": args.tp,
              "enforce_eager": args.enforce_eager, "cuda_graph_max_tokens": args.graph_max_tokens, "num_seqs": args.num_seqs,
              "output_tokens": output_tokens, "seconds": seconds,
              "output_tok_per_s": output_tokens / seconds, "steps": len(steps),
              "host_share": cpu_share, "device_idle_share": gap_share, "device_share": device_share,
              "phases": phases, "decode": breakdown, "copy_GBps": ceiling / 1e9,
              "hbm_floor_s": floor_s, "roofline_tok_per_s": output_tokens / floor_s,
              "pct_of_roofline": 100 * floor_s / seconds,
              "kv_blocks": llm.model_runner.num_blocks, "torch": torch.__version__,
              "python": platform.python_version()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
