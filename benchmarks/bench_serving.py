"""The engine in the serving regime: what a step costs, and what users see online.

    python benchmarks/bench_serving.py                         # both tables, qwen3-0.6b, H200
    python benchmarks/bench_serving.py --tables steps --model llama-3.1-8b
    python benchmarks/bench_serving.py --smoke                 # tiny model on the CPU: it runs

Table 1, step cost. Steps of a fixed shape run through the real engine loop (scheduler,
packing, launch, receive, update; asynchronous scheduling): B decoding requests at context
~`--context`, plus, for mixed steps, a stream of c-token prompts of one output token, the
token budget set to B + c so that every step carries B decodes and exactly one c-token
prefill. For each shape the median step: wall (one engine step), device (CUDA events),
host (the engine's own work on the step), idle (device waiting for the host), the path it
took (decode graph / mixed graph / eager, by policy.cuda_graphs' rule) and its floor:
max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate). Bytes: the
weights, the decodes' KV read and the step's KV written; FLOPs: 2 x linear parameters x
tokens + attention (QK^T and PV over each query's context).

Table 2, online. `python run.py mode=gpu trace=sharegpt trace.num_requests=N
trace.request_rate=R model=M hardware=H logger=none` (the replay the simulator is compared
with) at each rate: throughput and mean / p50 / p90 / p99 TTFT, TPOT, ITL and E2E.

Prints both tables, then one line of JSON.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_engine import checkpoint, copy_bandwidth  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from policy.cuda_graphs import graph_rows  # noqa: E402


def ceilings(cuda: bool) -> tuple[float, float]:
    """Measured copy bandwidth (bench_engine.copy_bandwidth) and bf16 matmul rate (FLOP/s,
    8192^3 on random data): medians of timed repeats after warm-up."""
    if not cuda:
        return float("nan"), float("nan")

    def median_s(fn, n=25):
        times = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times[5:])
    bw = copy_bandwidth()
    x, y = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 2 * 8192 ** 3 / median_s(lambda: x @ y)
    return bw, flops


class StepCosts:
    """Shapes of steps driven through one engine (see the module docstring)."""

    def __init__(self, llm: LLM, context: int, steps: int, seed: int = 0, profile=()):
        self.llm, self.context, self.steps = llm, context, steps
        self.profile = set(profile)      # (decodes, prefill) shapes to profile
        self.rng = torch.Generator().manual_seed(seed)
        runner = llm.model_runner
        mc = llm.model_config
        params = dict(runner.model.named_parameters())
        self.weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
        self.linear_params = sum(p.numel() for n, p in params.items()
                                 if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n)
        self.head_params = mc.vocab_size * mc.hidden_size
        self.kv_per_token = sum(layer.k_cache[0, 0].numel() * 2 * layer.k_cache.element_size()
                                for layer in runner.model.attention_layers())
        self.attn_width = mc.num_attention_heads * mc.head_dim * mc.num_hidden_layers
        self.decode_sizes = runner.packer.decode_sizes    # the graphs actually captured
        self.mixed_sizes = runner.packer.mixed_sizes

    def prompt(self, n: int) -> list[int]:
        return torch.randint(3, self.llm.model_config.vocab_size - 1, (n,), generator=self.rng).tolist()

    def set_budget(self, tokens: int) -> None:
        """The step's token budget (and, as the policy requires, max_num_seqs <= it)."""
        sched = self.llm.scheduler
        sched.config = replace(sched.config, max_num_batched_tokens=tokens,
                               max_num_seqs=min(self.llm.config.max_num_seqs, tokens))

    def run(self, batches: list[int], chunks: list[int], mixed_batches: list[int]) -> list[dict]:
        llm, rows = self.llm, []
        full_budget = llm.config.max_num_batched_tokens
        long = llm.config.max_model_len - self.context   # the decoders outlast the measurements
        for B in batches:
            self.set_budget(full_budget)
            ids = [llm.add_request(self.prompt(self.context), SamplingParams(
                temperature=0.6, max_tokens=long, ignore_eos=True)) for _ in range(B)]
            while not all(llm.sequences[i].num_computed_tokens >= self.context for i in ids):
                llm.step()
            for _ in range(4):   # the last prefill's tokens received: pure decode from here
                llm.step()
            rows.append(self.measure(B, 0, lambda: llm.step()))
            for c in (chunks if B in mixed_batches else []):
                self.set_budget(B + c)
                queue = [self.prompt(c) for _ in range(self.steps + 6)]

                def step(queue=queue):
                    if len(llm.scheduler.waiting) < 2 and queue:
                        llm.add_request(queue.pop(), SamplingParams(temperature=0.6, max_tokens=1, ignore_eos=True))
                    llm.step()
                rows.append(self.measure(B, c, step))
                while llm.scheduler.waiting:   # the queued prompts run out
                    llm.step()
            for i in ids:
                llm.abort(i)
            while llm.has_unfinished():
                llm.step()
            print(f"  B={B} done", file=sys.stderr, flush=True)
        return rows

    def measure(self, B: int, c: int, step) -> dict:
        """Run steps until `self.steps` of them have exactly this shape; medians."""
        llm, got, tries = self.llm, [], 0
        while len(got) < self.steps and tries < 4 * self.steps + 20:
            n = len(llm.step_records)
            step()
            tries += 1
            got += [r for r in llm.step_records[n:]
                    if r["num_seqs"] == B + (c > 0) and r["num_prefill_tokens"] == c]
        llm.step()   # the last measured step's device time arrives with the next step
        got = [r for r in got if r["device_s"] == r["device_s"]]   # NaN: not received yet
        if (B, c) in self.profile:
            profile_steps(step, B, c)
        row = {"decodes": B, "prefill": c, "steps": len(got)}
        if not got:
            return row
        med = lambda key: statistics.median(r[key] for r in got) * 1e3  # noqa: E731
        ctx = statistics.median(r.get("context_tokens", 0) or 0 for r in got)
        path, padded = graph_rows(B + c, B + (c > 0), c == 0, self.decode_sizes, self.mixed_sizes)
        row.update(wall_ms=med("duration_s"), device_ms=med("device_s"), host_ms=med("cpu_s"),
                   idle_ms=med("gpu_gap_s"), path=path, padded_tokens=padded, median_context=ctx)
        return row

    def floor(self, row: dict, bandwidth: float, flops: float) -> dict:
        B, c, ctx = row["decodes"], row["prefill"], self.context
        nbytes = self.weight_bytes + self.kv_per_token * (B * ctx + c)
        attn = 4 * self.attn_width * (B * ctx + c * (c + 1) / 2)
        work = 2 * self.linear_params * (B + c) + 2 * self.head_params * (B + (c > 0)) + attn
        floor_s = max(nbytes / bandwidth, work / flops)
        wall = row.get("wall_ms", float("nan"))
        return {"floor_ms": floor_s * 1e3, "bound": "bytes" if nbytes / bandwidth >= work / flops else "flops",
                "GBps": nbytes / (row.get("device_ms", float("nan")) / 1e3) / 1e9,
                "TFLOPs": work / (row.get("device_ms", float("nan")) / 1e3) / 1e12,
                "wall_over_floor": wall / (floor_s * 1e3),
                "target_ms": 1.25 * floor_s * 1e3 + 0.5}


def profile_steps(step, B: int, c: int, n: int = 6) -> None:
    """torch.profiler over n steps of this shape: the kernels that take the device time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.count, getattr(e, "self_device_time_total", 0.0)) for e in prof.key_averages()),
                  key=lambda r: -r[2])
    total = sum(r[2] for r in rows) or float("nan")
    print(f"\nprofile: {B} decodes + {c} prefill tokens, device {total / n / 1e3:.3f} ms/step")
    for key, count, us in rows[:14]:
        print(f"  {key[:64]:<64} {count / n:>6.1f}/step {us / n:>9.1f} us {100 * us / total:>5.1f}%")


def step_table(args, path: str, extra: dict) -> tuple[list[dict], dict]:
    cuda = torch.cuda.is_available() and not extra
    bandwidth, flops = ceilings(cuda)
    llm = LLM(path, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              cuda_graph_max_tokens=args.graph_max_tokens, enforce_eager=args.enforce_eager, pdl_max_tokens=args.pdl_max_tokens, kernel_plan=args.kernel_plan,
              attention_streams=args.attention_streams,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False, **extra)
    shapes = [tuple(map(int, x.split(":"))) for x in args.profile.split(",") if x]
    costs = StepCosts(llm, args.context, args.steps, profile=shapes)
    rows = costs.run(ints(args.decode_batches), ints(args.chunks), ints(args.mixed_batches))
    for r in rows:
        if r["steps"]:
            r |= costs.floor(r, bandwidth, flops)
    llm.close()
    meta = {"copy_GBps": bandwidth / 1e9, "matmul_TFLOPs": flops / 1e12,
            "weight_GB": costs.weight_bytes / 1e9, "kv_KiB_per_token": costs.kv_per_token / 1024}
    print(f"\nstep cost, {args.model} on {device_name(cuda)}: context ~{args.context}, median of "
          f"{args.steps} steps; copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    print(f"{'decodes':>7} {'prefill':>7} {'path':>7} {'padded':>6} {'wall ms':>8} {'device ms':>9} "
          f"{'host ms':>8} {'idle ms':>8} {'floor ms':>8} {'bound':>5} {'wall/floor':>10} "
          f"{'target ms':>9} {'GB/s':>6} {'TFLOP/s':>7}")
    for r in rows:
        if not r["steps"]:
            print(f"{r['decodes']:>7} {r['prefill']:>7}   (no step of this shape)")
            continue
        print(f"{r['decodes']:>7} {r['prefill']:>7} {r['path']:>7} {r['padded_tokens']:>6} {r['wall_ms']:>8.3f} "
              f"{r['device_ms']:>9.3f} {r['host_ms']:>8.3f} {r['idle_ms']:>8.3f} {r['floor_ms']:>8.3f} "
              f"{r['bound']:>5} {r['wall_over_floor']:>10.2f} {r['target_ms']:>9.2f} {r['GBps']:>6.0f} "
              f"{r['TFLOPs']:>7.1f}")
    return rows, meta


def online_table(args, smoke: bool) -> list[dict]:
    """run.py replays of ShareGPT at each rate (one process each: a fresh engine)."""
    rows = []
    out_root = Path(args.out or tempfile.mkdtemp(prefix="bench_serving_"))
    for spec in args.online.split(";"):
        model, rates = spec.split("@")
        for rate in rates.split(","):
            run_dir = out_root / f"{model}-r{rate}"
            cmd = [sys.executable, str(ROOT / "run.py"), "mode=gpu", "trace=sharegpt",
                   f"trace.num_requests={args.num_requests}", f"trace.request_rate={rate}",
                   f"model={model}", f"hardware={args.hardware}", "logger=none",
                   f"hydra.run.dir={run_dir}"] + args.override
            if smoke:
                cmd += ["engine.device=cpu", "engine.dtype=float32"]
            print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
                rows.append({"model": model, "rate": float(rate), "error": proc.returncode})
                continue
            m = json.loads((run_dir / "summary.json").read_text())["metrics"]
            row = {"model": model, "rate": float(rate), "wall_s": time.perf_counter() - start,
                   "completed": m["completed"], "req_per_s": m["request_throughput"],
                   "out_tok_per_s": m["output_throughput"]}
            for lat in ("ttft", "tpot", "itl", "e2el"):
                for stat in ("mean", "median", "p90", "p99"):
                    row[f"{stat}_{lat}_ms"] = m[f"{stat}_{lat}_ms"]
            rows.append(row)
    print(f"\nonline: ShareGPT {args.num_requests} requests, Poisson arrivals, run.py mode=gpu "
          f"(ms; p50 = median)")
    head = f"{'model':>14} {'req/s':>6} {'done':>5} {'tok/s':>8}"
    for lat in ("TTFT", "TPOT", "ITL", "E2E"):
        head += f" {lat + ' mean':>10} {'p50':>7} {'p90':>7} {'p99':>7}"
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['model']:>14} {r['rate']:>6g}  failed (exit {r['error']})")
            continue
        line = f"{r['model']:>14} {r['rate']:>6g} {r['completed']:>5} {r['out_tok_per_s']:>8.0f}"
        for lat in ("ttft", "tpot", "itl", "e2el"):
            line += (f" {r[f'mean_{lat}_ms']:>10.1f} {r[f'median_{lat}_ms']:>7.1f} "
                     f"{r[f'p90_{lat}_ms']:>7.1f} {r[f'p99_{lat}_ms']:>7.1f}")
        print(line)
    return rows


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def device_name(cuda: bool) -> str:
    return torch.cuda.get_device_name() if cuda else "cpu"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default="steps,online", help="steps, online, or both")
    ap.add_argument("--model", default="qwen3-0.6b", help="step table: model dir or conf/model name")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12, help="measured steps per shape")
    ap.add_argument("--decode-batches", default="1,16,64,256")
    ap.add_argument("--mixed-batches", default="1,64,256")
    ap.add_argument("--chunks", default="16,128,512,2048,8192")
    ap.add_argument("--max-model-len", type=int, default=10240)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8448)
    ap.add_argument("--graph-max-tokens", type=int, default=8448)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--pdl-max-tokens", type=int, default=32, help="EngineConfig.pdl_max_tokens (0: no PDL, A/B)")
    ap.add_argument("--attention-streams", action="store_true",
                    help="EngineConfig.attention_streams: a mixed step's decode attention on a second stream (A/B)")
    ap.add_argument("--kernel-plan", help="EngineConfig.kernel_plan: a file pinning the skinny-GEMM choice "
                    "(written by the first run that names it, read by the others: A/B runs on one kernel plan)")
    ap.add_argument("--profile", default="", help="decodes:prefill shapes to profile, e.g. 64:2048,64:16")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--online", default="qwen3-0.6b@8,16,32;llama-3.1-8b@8",
                    help="model@rate,rate;model@rate (conf/model names)")
    ap.add_argument("--num-requests", type=int, default=400)
    ap.add_argument("--hardware", default="h200")
    ap.add_argument("--override", nargs="*", default=[], help="extra run.py overrides")
    ap.add_argument("--out", help="folder for the online runs' result folders")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, small shapes")
    args = ap.parse_args()
    extra = {}
    if args.smoke:
        args.model, args.context, args.steps = "tiny-qwen3", 48, 3
        args.decode_batches, args.mixed_batches, args.chunks = "1,4", "1,4", "16,40"
        args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens = 256, 8, 48
        args.tables = "steps"
        if not torch.cuda.is_available():
            extra = dict(device="cpu", dtype="float32", num_gpu_blocks=512, attention_backend="torch")
    tables = args.tables.split(",")
    result = {"bench": "serving", "device": device_name(torch.cuda.is_available() and not extra)}
    if "steps" in tables:
        rows, meta = step_table(args, checkpoint(args.model, "float32" if args.smoke else "bfloat16"), extra)
        result |= {"model": args.model, "steps": rows, **meta}
    if "online" in tables:
        result["online"] = online_table(args, args.smoke)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
