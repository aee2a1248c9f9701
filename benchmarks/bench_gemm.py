"""Decode-sized GEMMs: cuBLAS (torch.nn.functional.linear) against the Triton skinny GEMM
(engine/kernels/skinny_gemm.py) for every linear shape of Qwen3-0.6B and Llama-3.1-8B
(tensor parallel 1 and 2 shards, LM head included) at M = 1, 2, 4, 8, 16, 32, 64 rows, in
bf16, against the measured copy ceiling.

    python benchmarks/bench_gemm.py            # GPU: all shapes, under 90 s on an H200
    python benchmarks/bench_gemm.py --sweep    # + a tile / stage grid per TP=1 shape at M = 1, 16, 64 (minutes)
    python benchmarks/bench_gemm.py --smoke    # tiny shapes on the CPU (Triton interpreter): it runs
    python benchmarks/bench_gemm.py --engine qwen3-0.6b --stages engine   # engine A/B only (~2 min)
    python benchmarks/bench_gemm.py --engine qwen3-0.6b --stages launches # kernels per decode step
    python benchmarks/bench_gemm.py --smoke --stages launches             # the same on the CPU (tiny Qwen3)

Method: per (shape, M, path), a CUDA graph of >= 100 back-to-back calls rotating over copies
of the weight that together exceed twice the L2 (so every call reads its weight from HBM, as
in a decode step where the other layers' weights evict it), replayed after a warm-up; the
time per call is the median replay time / calls. The Triton kernel is timed at every split
factor `choose_skinny_gemm` tries (engine.kernels.skinny_gemm.split_candidates): `triton`
is the launch rule's split, `best` the fastest, what the engine's load-time choice would
pick. GB/s counts weight bytes only (x and y are < 1% of them); % copy is against a 1 GiB
device-to-device copy measured in the same run (bytes read + written / time).

Stage `engine` (with --engine MODEL: a model directory or a conf/model name, random weights
written once): the engine's decode step at batch 1, 16, 64 (context ~1k, CUDA graphs, bf16,
bench_engine.decode_breakdown) with skinny_gemm off, then on, built one after the other;
its load-time choice (which shapes and M took the kernel); the extra start-up time; and the
share of equal greedy tokens between the two (16 prompts x 32 tokens; both accumulate in
fp32 in a different order, so only near-tied logits may flip).

Stage `launches`: kernels per decode step and per decoder layer (layer 0), counted from
Python on eager decode steps (the launches a CUDA graph of the step captures; see
`count_launches`) at batch 1 and 16, context ~1k (split-KV decode at batch 1), with every
GEMM on cuBLAS and with the skinny-GEMM load-time choice (smoke: tiny Qwen3 in fp32 on the
Triton interpreter, every projection on the kernel, the norms and SiLU-and-mul fused in);
on a GPU also torch.profiler's count
of device kernels in the same step, which is the truth where one torch op launches several
(cuBLAS split-K).

Tables: per shape and M (cuBLAS us, GB/s, % copy; Triton rule us; Triton best us, split,
GB/s, % copy; speedup of the better path over cuBLAS; max relative difference from
cuBLAS' output over every split timed), then per model / TP and M the GEMM time of one decode step (every layer's four
GEMMs + the LM head): cuBLAS, the engine's choice (the faster path per shape), and the floor
(weight bytes / copy bandwidth). Ends with one line of JSON.
"""
import argparse
import collections
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():   # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

from engine.kernels.skinny_gemm import (default_split_k, num_sms, skinny_gemm,  # noqa: E402
                                        split_candidates)

# hidden size, q and kv widths (heads x head_dim), MLP width, vocabulary, layers
MODELS = {
    "qwen3-0.6b": dict(hidden=1024, q=16 * 128, kv=8 * 128, inter=3072, vocab=151936, layers=28),
    "llama-3.1-8b": dict(hidden=4096, q=32 * 128, kv=8 * 128, inter=14336, vocab=128256, layers=32),
}
MS = [1, 2, 4, 8, 16, 32, 64]
SMOKE_MS = [1, 3]
MIN_CALLS = 100        # calls per timed graph
REPLAYS = 7
SWEEP_MS = [1, 16, 64]
SWEEP_CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, num_stages=st, num_warps=4)
                 for bn in (64, 128) for bk in (64, 128, 256) for st in (3, 5)]


def linear_shapes(model: dict, tp: int) -> list[tuple[str, int, int, int]]:
    """(layer, N, K, count per step) of one tensor-parallel rank, fused as the engine runs them."""
    h, q, kv, i, v, n = (model[key] for key in ("hidden", "q", "kv", "inter", "vocab", "layers"))
    return [("qkv", (q + 2 * kv) // tp, h, n), ("o", h, q // tp, n),
            ("gate_up", 2 * i // tp, h, n), ("down", h, i // tp, n), ("lm_head", v // tp, h, 1)]


def copy_ceiling(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes` (median)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        times.append(time_once(lambda: dst.copy_(src), device))
    return 2 * src.nbytes / statistics.median(times[2:])


def time_once(fn, device: torch.device) -> float:
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def per_call_us(call, copies: int, device: torch.device) -> float:
    """Median microseconds per call(i) (i: the weight copy to use): a CUDA graph of at least
    MIN_CALLS calls rotating over the copies, replayed REPLAYS times; on the CPU, wall time
    of one eager pass."""
    for i in range(copies):   # warm-up: compile, workspace
        call(i)
    if device.type != "cuda":
        return time_once(lambda: [call(i) for i in range(copies)], device) / copies * 1e6
    calls = copies * math.ceil(MIN_CALLS / copies)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i % copies)
    graph.replay()
    times = [time_once(graph.replay, device) for _ in range(REPLAYS)]
    del graph
    return statistics.median(times) / calls * 1e6


def bench_shape(name: str, n: int, k: int, ms: list[int], device, dtype, rotate_bytes: int,
                ceiling: float, sweep: bool) -> list[dict]:
    wbytes = n * k * dtype.itemsize
    copies = max(1, math.ceil(rotate_bytes / wbytes))
    gen = torch.Generator(device).manual_seed(n * 31 + k)
    weights = [(torch.randn(n, k, device=device, generator=gen) * 0.02).to(dtype)
               for _ in range(copies)]
    sms = num_sms(device)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device, generator=gen).to(dtype)
        row = dict(layer=name, n=n, k=k, m=m, weight_MB=wbytes / 1e6, copies=copies)
        row["cublas_us"] = per_call_us(lambda i: F.linear(x, weights[i]), copies, device)
        timed = {s: per_call_us(lambda i: skinny_gemm(x, weights[i], None, s), copies, device)
                 for s in split_candidates(n, k, sms)}
        row["triton_us"] = timed[default_split_k(n, k, sms)]   # the launch rule's split
        row["best_split"] = min(timed, key=timed.get)
        row["best_us"] = timed[row["best_split"]]
        ref = F.linear(x, weights[0]).float()
        row["err"] = max(((skinny_gemm(x, weights[0], None, s).float() - ref).abs().max()
                          / ref.abs().max()).item() for s in timed)   # every split timed
        for path in ("cublas", "triton", "best"):
            row[f"{path}_GBps"] = wbytes / row[f"{path}_us"] / 1e3
            row[f"{path}_pct_copy"] = 100 * row[f"{path}_GBps"] * 1e9 / ceiling
        row["speedup"] = row["cublas_us"] / min(row["cublas_us"], row["best_us"])
        if sweep and m in SWEEP_MS:
            row["sweep"] = sweep_shape(x, weights, n, k, copies, device)
        rows.append(row)
    return rows


def sweep_shape(x, weights, n: int, k: int, copies: int, device) -> dict:
    """The fastest of SWEEP_CONFIGS x split factors (configs that do not compile are skipped)."""
    best = None
    for cfg in SWEEP_CONFIGS:
        for s in sorted({1, 2, 4, 8, 16}):
            try:
                us = per_call_us(lambda i: skinny_gemm(x, weights[i], None, s, cfg), copies, device)
            except Exception as e:   # out of shared memory / registers for this tile
                print(f"  sweep skip {cfg} split {s}: {type(e).__name__}", file=sys.stderr)
                break
            if best is None or us < best["us"]:
                best = dict(us=us, split_k=s, **cfg)
    return best


def bench_engine_ab(model: str, batches: list[int], context: int, steps: int) -> dict:
    """Decode steps of the engine with skinny_gemm off and on (see the module docstring)."""
    import gc

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_engine import checkpoint, decode_breakdown
    from engine import LLM, SamplingParams
    path = checkpoint(model, "bfloat16")
    prompts = [[(31 * i + 7 * j) % 10000 + 3 for j in range(20 + 13 * i)] for i in range(16)]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    out = {"model": model, "runs": []}
    tokens = []
    gc.collect()
    torch.cuda.empty_cache()   # the GEMM stage's cached blocks would count as used memory
    for skinny in (False, True):
        start = time.perf_counter()
        llm = LLM(path, dtype="bfloat16", skinny_gemm=skinny, max_model_len=context + 256,
                  max_num_seqs=max(batches), max_num_batched_tokens=4096,
                  cuda_graph_max_tokens=512, gpu_memory_utilization=0.4)
        run = {"skinny_gemm": skinny, "startup_s": time.perf_counter() - start,
               "choice": llm.model_runner.skinny_report,
               "decode": [decode_breakdown(llm, b, context, steps) for b in batches]}
        tokens.append([o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)])
        out["runs"].append(run)
        llm.close()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    pairs = [(a, b) for sa, sb in zip(*tokens) for a, b in zip(sa, sb)]
    out["equal_tokens"] = sum(a == b for a, b in pairs) / len(pairs)
    return out


def print_engine(res: dict) -> None:
    off, on = res["runs"]
    print(f"\nengine decode step, {res['model']} bf16, skinny_gemm off vs on (median step ms)")
    print(f"{'batch':>5} {'off ms':>8} {'on ms':>8} {'off dev':>8} {'on dev':>8} {'speedup':>8}")
    for a, b in zip(off["decode"], on["decode"]):
        if a.get("steps") and b.get("steps"):
            print(f"{a['batch']:>5} {a['step_ms']:>8.3f} {b['step_ms']:>8.3f} {a['device_ms']:>8.3f} "
                  f"{b['device_ms']:>8.3f} {a['step_ms'] / b['step_ms']:>7.2f}x")
    print(f"start-up {off['startup_s']:.1f} s off, {on['startup_s']:.1f} s on; equal greedy "
          f"tokens {100 * res['equal_tokens']:.1f}%")
    print_choice(on["choice"])


def print_choice(report: list[dict]) -> None:
    print("load-time choice (us per call, torch / kernel, * = kernel; down projections with "
          "SiLU-and-mul; after norms: norm + chosen / fused, + = fused)")
    shapes = {}
    for r in report:
        cell = f"M{r['m']} {r['torch_us']:.1f}/{r['triton_us']:.1f}{'*' if r['skinny'] else ''}"
        if "norm_fused" in r:
            cell += f" [{r['norm_pair_us']:.1f}/{r['norm_fused_us']:.1f}{'+' if r['norm_fused'] else ''}]"
        name = "down" if r.get("swiglu") else "after norm" if "norm_fused" in r else ""
        shapes.setdefault((r["n"], r["k"], r["layers"], name), []).append(cell)
    for (n, k, layers, name), cells in shapes.items():
        print(f"  N={n} K={k} x{layers} {name}: " + ", ".join(cells))


# ---- launches per decode step -------------------------------------------------------------

# torch operators that launch no device kernel (views are recognised by their schema)
NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::detach", "aten::alias",
             "aten::_unsafe_view", "aten::lift_fresh", "aten::_local_scalar_dense", "aten::set_",
             "aten::resize_"}


@contextlib.contextmanager
def count_launches():
    """Counts the kernel launches issued from Python inside the block (none inside a CUDA
    graph replay): 'triton <kernel>' per Triton `kernel[grid](...)` call, and one per torch
    operator that computes ('aten::mm', ...; views, allocations and host reads excluded).
    Nested blocks all count. On a GPU one torch operator can launch several kernels (cuBLAS
    split-K), so torch.profiler's count is the device truth; this one also runs on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.jit import KernelInterface
    counts = collections.Counter()
    in_triton = [False]   # the interpreter's own tensor copies are not launches
    getitem = KernelInterface.__getitem__

    def launch(kernel, grid):
        run = getitem(kernel, grid)

        def counted(*args, **kwargs):
            counts[f"triton {kernel.__name__}"] += 1
            outer, in_triton[0] = in_triton[0], True
            try:
                return run(*args, **kwargs)
            finally:
                in_triton[0] = outer
        return counted

    class TorchOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if not in_triton[0] and not func.is_view and name not in NO_KERNEL:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    KernelInterface.__getitem__ = launch
    try:
        with TorchOps():
            yield counts
    finally:
        KernelInterface.__getitem__ = getitem


def decode_step_launches(llm, batch: int, context: int) -> dict:
    """Launches of one decode-only step of `batch` sequences at ~`context` tokens: per step
    and in decoder layer 0; on CUDA also the profiler's device kernel count."""
    from engine import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = len(llm.step_records)
    for i in range(batch):
        llm.add_request([(7 * i + j) % 500 + 3 for j in range(context)], params)
    while len(llm.step_records) == first or llm.step_records[-1]["num_prefill_tokens"]:
        llm.step()                       # the prefill, up to the first decode-only step
    layer = llm.model_runner.model.model.layers[0]
    per_layer = collections.Counter()

    def counted(*args, **kwargs):
        with count_launches() as c:
            out = real(*args, **kwargs)
        per_layer.update(c)
        return out
    real, layer.forward = layer.forward, counted
    try:
        with count_launches() as per_step:
            llm.step()
    finally:
        del layer.forward
    row = dict(batch=batch, context=context, step=sum(per_step.values()), layer=sum(per_layer.values()),
               layer_kernels=dict(per_layer), step_kernels=dict(per_step),
               decode_only=llm.step_records[-1]["num_prefill_tokens"] == 0
               and llm.step_records[-1]["num_seqs"] == batch)
    if torch.cuda.is_available():
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.step()
            torch.cuda.synchronize()
        row["profiler_device_events"] = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    while llm.has_unfinished():
        llm.step()
    return row


def bench_launches(model: str | None, batches: list[int], context: int, smoke: bool) -> dict:
    """Kernels per decode step (see the module docstring): every GEMM on cuBLAS, then with
    the skinny-GEMM plans (GPU: the load-time choice; smoke: every projection on the kernel,
    SiLU-and-mul and both norms inside)."""
    import tempfile

    from engine import LLM
    from engine.kernels.skinny_gemm import MAX_M, choose_skinny_gemm
    if smoke:
        from engine.checkpoint import tiny_config, write_random_checkpoint
        path = str(write_random_checkpoint(tiny_config("qwen3"), os.path.join(
            tempfile.mkdtemp(), "tiny-qwen3"), dtype="float32", std=0.3, progress=False))
        llm = LLM(path, device="cpu", dtype="float32", attention_backend="triton",
                  num_gpu_blocks=4 * max(batches) * (context // 16 + 2), max_model_len=context + 16,
                  max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * (context + 16))
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_engine import checkpoint
        # eager steps: the Python count sees the launches a graph would capture
        llm = LLM(checkpoint(model, "bfloat16"), dtype="bfloat16", enforce_eager=True,
                  max_model_len=context + 64, max_num_seqs=max(batches),
                  max_num_batched_tokens=4096, gpu_memory_utilization=0.4)
    routed = [m for m in llm.model_runner.model.modules() if hasattr(m, "skinny")]
    out = {"model": model or "tiny-qwen3", "rows": []}
    for plan in ("cublas", "skinny"):
        if plan == "cublas":
            for m in routed:
                m.skinny = m.skinny_norm = ()
        elif smoke:
            for m in routed:
                m.skinny = ((MAX_M, 2),)
                m.skinny_norm = ((MAX_M, 2),) if getattr(m, "norm_input", False) else ()
        else:
            out["choice"] = choose_skinny_gemm(llm.model_runner.model)
        for b in batches:
            out["rows"].append(dict(plan=plan, **decode_step_launches(llm, b, context)))
    llm.close()
    return out


def print_launches(res: dict) -> None:
    if res.get("choice"):
        print_choice(res["choice"])
    print(f"\nlaunches per decode step, {res['model']} (counted from Python on eager steps)")
    print(f"{'plan':>7} {'batch':>5} {'context':>7} {'step':>5} {'layer 0':>7} {'profiler':>8}  layer 0 kernels"
          " (* = the counted step was not decode-only)")
    for r in res["rows"]:
        kernels = ", ".join(f"{k.removeprefix('triton ')} x{n}" if n > 1 else k.removeprefix("triton ")
                            for k, n in r["layer_kernels"].items())
        print(f"{r['plan']:>7} {r['batch']:>5} {r['context']:>7} {r['step']:>5} {r['layer']:>7} "
              f"{r.get('profiler_device_events', '-'):>8}  {kernels}{'' if r['decode_only'] else ' *'}")


def step_summary(rows: list[dict], shapes, ceiling: float) -> list[dict]:
    """Per M: one decode step's GEMM time (every layer's GEMMs + the LM head)."""
    count = {name: c for name, _, _, c in shapes}
    out = []
    for m in sorted({r["m"] for r in rows}):
        at = [r for r in rows if r["m"] == m]
        total = lambda key: sum(count[r["layer"]] * key(r) for r in at)  # noqa: E731
        out.append(dict(m=m, cublas_us=total(lambda r: r["cublas_us"]),
                        triton_us=total(lambda r: r["triton_us"]),
                        chosen_us=total(lambda r: min(r["cublas_us"], r["best_us"])),
                        floor_us=total(lambda r: r["weight_MB"] * 1e6 / ceiling * 1e6)))
    return out


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tp", default="1,2", help="tensor-parallel shards to time")
    ap.add_argument("--sweep", action="store_true", help="also time a tile / stage grid (TP=1, M=1,16,64)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; CPU when no GPU")
    ap.add_argument("--stages", default="gemm",
                    help="gemm,engine,launches (engine needs --engine; launches needs --engine or --smoke)")
    ap.add_argument("--engine", metavar="MODEL", help="engine A/B on this model (dir or conf/model name)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    if args.smoke:
        plan = [("tiny", 1, [("qkv", 96, 64, 2), ("o", 64, 600, 2), ("lm_head", 200, 64, 1)])]
        ms, ceiling_bytes = SMOKE_MS, 16 << 20
    else:
        plan = [(name, tp, linear_shapes(MODELS[name], tp))
                for name in args.models.split(",") for tp in map(int, args.tp.split(","))]
        ms, ceiling_bytes = MS, 1 << 30
    ceiling = copy_ceiling(device, ceiling_bytes)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if cuda else 0
    rotate_bytes = max(128 << 20, 2 * l2) if cuda else 0
    name = torch.cuda.get_device_name() if cuda else "cpu"
    out = {"bench": "gemm", "device": name, "dtype": str(dtype).removeprefix("torch."),
           "copy_GBps": ceiling / 1e9, "l2_MB": l2 / 1e6, "rows": [], "steps": []}
    t0 = time.perf_counter()
    stages = args.stages.split(",")
    if args.engine and not {"engine", "launches"} & set(stages):
        stages.append("engine")
    for model, tp, shapes in (plan if "gemm" in stages else []):
        rows = []
        for layer, n, k, _ in shapes:
            sweep = args.sweep and tp == 1
            rows += bench_shape(layer, n, k, ms, device, dtype, rotate_bytes, ceiling, sweep)
        for r in rows:
            r.update(model=model, tp=tp)
        out["rows"] += rows
        out["steps"] += [dict(model=model, tp=tp, **s) for s in step_summary(rows, shapes, ceiling)]
    out["seconds"] = time.perf_counter() - t0
    if out["rows"]:
        print_tables(out)
    if "engine" in stages:
        if not (cuda and args.engine):
            raise SystemExit("the engine stage needs a GPU and --engine MODEL")
        out["engine"] = bench_engine_ab(args.engine, [1, 16, 64], 1024, 30)
        print_engine(out["engine"])
    if "launches" in stages:
        if not (args.smoke or (cuda and args.engine)):
            raise SystemExit("the launches stage needs --smoke, or a GPU and --engine MODEL")
        if args.smoke:
            out["launches"] = bench_launches(None, [1, 3], 200, smoke=True)
        else:
            out["launches"] = bench_launches(args.engine, [1, 16], 1024, smoke=False)
        print_launches(out["launches"])
    print(json.dumps(out, default=float))


def print_tables(out: dict) -> None:
    print(f"\nskinny GEMM vs cuBLAS on {out['device']}, {out['dtype']}; copy ceiling "
          f"{out['copy_GBps']:.0f} GB/s; us per call (weights from HBM), weight GB/s, % of copy")
    print(f"{'model':>13} {'tp':>2} {'layer':>8} {'N':>7} {'K':>6} {'M':>3} | {'cuBLAS':>8} "
          f"{'GB/s':>6} {'%copy':>6} | {'triton':>8} {'best':>8} {'split':>5} {'GB/s':>6} "
          f"{'%copy':>6} | {'speedup':>7} {'max err':>8}")
    for r in out["rows"]:
        print(f"{r['model']:>13} {r['tp']:>2} {r['layer']:>8} {r['n']:>7} {r['k']:>6} {r['m']:>3} | "
              f"{r['cublas_us']:>8.2f} {r['cublas_GBps']:>6.0f} {r['cublas_pct_copy']:>5.1f}% | "
              f"{r['triton_us']:>8.2f} {r['best_us']:>8.2f} {r['best_split']:>5} "
              f"{r['best_GBps']:>6.0f} {r['best_pct_copy']:>5.1f}% | {r['speedup']:>6.2f}x "
              f"{r['err']:>8.1e}")
    for r in out["rows"]:
        if r.get("sweep"):
            print(f"sweep {r['model']} {r['layer']} M={r['m']}: best {r['sweep']['us']:.2f} us "
                  f"(rule {r['triton_us']:.2f}) with {r['sweep']}")
    print("\nGEMM time of one decode step (every layer's GEMMs + LM head), us")
    print(f"{'model':>13} {'tp':>2} {'M':>3} {'cuBLAS':>9} {'triton':>9} {'chosen':>9} "
          f"{'floor':>9} {'chosen/floor':>12} {'saved':>8}")
    for s in out["steps"]:
        print(f"{s['model']:>13} {s['tp']:>2} {s['m']:>3} {s['cublas_us']:>9.1f} "
              f"{s['triton_us']:>9.1f} {s['chosen_us']:>9.1f} {s['floor_us']:>9.1f} "
              f"{s['chosen_us'] / s['floor_us']:>11.2f}x {s['cublas_us'] - s['chosen_us']:>8.1f}")
    print(f"({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
