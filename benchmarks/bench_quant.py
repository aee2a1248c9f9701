"""4-bit weights against bf16: the W4A16 paths per linear layer, and the engine's decode
step, prefill and KV pool, for Llama-3.1-8B in GPTQ and AWQ (random weights in the published
layouts, engine.checkpoint --quantization) against bf16.

    OUT=$OUT bash benchmarks/h200_quant.sh   # H200, one call <= 6 min: kernels old vs repacked
                                             # vs bf16 at M = 1/16/64, engine bf16/GPTQ/AWQ
    python benchmarks/bench_quant.py --stages layers,check --sweep     # H200, ~3 min
    python benchmarks/bench_quant.py --stages engine --formats gptq,awq --nano \\
        --reference benchmarks/raw/h200_quant_engine_bf16.txt --time-budget 330
    python benchmarks/bench_quant.py --stages engine --formats gptq,awq \
        --kernel-plan /tmp/quant-plan-{format}.json   # A/B runs on one W4A16 choice per format
    python benchmarks/bench_quant.py --stages pin --formats gptq,awq --model qwen3-0.6b   # H200, ~2 min
    python benchmarks/bench_quant.py --smoke                  # tiny shapes on the CPU: it runs

Stages:
  layers  each Llama-3.1-8B linear shape (qkv, o, gate_up, down) at M = --layer-m (1, 16, 32,
          64, 256, 2048): cuBLAS bf16 against every W4A16 launch the engine's load-time choice
          (engine.kernels.w4a16.choose_w4a16) considers at that M, on --kernel-formats (GPTQ
          group 128, AWQ, GPTQ act-order) tensors, each in the checkpoint layout (`gptq`: the
          kernels before the repack) and repacked as the engine now loads them (`gptq+r`: the
          stream and fma kernels at M = 1, the mma, swap and slice kernels at M <= 64, the
          others reading the repacked words; --layouts picks). Every candidate's line (us, packed-
          weight GB/s, % of the copy ceiling, cuBLAS bf16 alongside) is printed as its shape
          and M are measured, then a summary. Each time is one CUDA-graph replay over `--copies`
          copies of the layer (distinct weights, so they come from HBM as in a step), per
          layer; weight GB/s against the measured copy ceiling (a 1 GiB device copy); the
          error of the chosen launch against the torch reference (max |y - y_ref| / max
          |y_ref|, y_ref = x @ dequantized W in fp32). Up to --pdl-rows rows the W4A16
          launches run with programmatic dependent launch (each program's weight slice
          prefetched into L2 while the previous launch finishes), as decode steps run them;
          cuBLAS bf16 without (the engine's bf16 decode runs engine.kernels.skinny_gemm).
          --sweep: the decode kernel's tile / warp / split grid (both forms at M = 1) at
          M = 1, 16, 64 and the tiled kernel's at M = 2,048 (GPTQ); configurations that do not
          fit the device (shared memory) or do not compile are skipped and counted.
  engine  per format: the load time (the W4A16 choice included) and the choice per layer
          shape, the median decode step at batch 1, 16, 64, 256 (context ~1k, CUDA graphs as
          served), one 2,048-token prefill by device time (the engine's step wall time of an
          asynchronous step is only its launch), the weight bytes and the KV pool the engine
          sized from the memory left (engine figures: bench_engine.decode_breakdown).
          --nano: nano-vLLM's bench workload per format. --reference: a saved bench_quant output
          whose bf16 engine figures the table compares against (when bf16 is not run here).
          --kernel-plan: EngineConfig.kernel_plan per format ({format} in the path: bf16, gptq
          and awq are different models, one plan each): the first run times the choice and
          writes it, later runs read it and time nothing (the choice printed is the one run).
  check   bf16 correctness on the device: a small Llama (hidden 1024, 4 layers) per format
          against its dequantized bf16 twin (engine.checkpoint.write_dequantized_checkpoint),
          greedy, 16 prompts x 32 tokens: the share of equal tokens and of equal sequences.
          The twin multiplies bf16-rounded dequantized weights; the W4A16 decode kernel
          applies zero and scale in fp32 after the dot, so the two differ in the last bits
          and tokens agree except where two logits nearly tie (common with random weights).
  pin     per format: the kernel plan (engine.kernel_plan) on this device: one engine times
          the start-up choice and writes a fresh plan, a second reads it; their load seconds,
          whether the second runs the first one's W4A16 launches (kernel_plan.describe), the
          greedy tokens of 16 prompts x 32 tokens of both (equal: same kernels, same order),
          and the median decode step at the first two --decode-batches of both.
--time-budget: seconds for the run; the nano workload, the sweep and each check format are
skipped (saying so) when less than they need (*_RESERVE_S) is left.
Progress goes to stderr as it happens; tables to stdout; the last line is one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():   # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine import copy_bandwidth, decode_breakdown, nano_workload  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint import (quantization_config, quantized_tensors, tiny_config,  # noqa: E402
                               write_dequantized_checkpoint, write_random_checkpoint)
from engine.kernels import pdl, w4a16  # noqa: E402
from engine.kernels.skinny_gemm import graph_time_us  # noqa: E402
from engine.layers.quant import dequantize_awq, dequantize_gptq  # noqa: E402
from policy.quantization import QuantConfig  # noqa: E402

# (name, in_features, out_features) of one Llama-3.1-8B layer's linears, fused as the engine runs them
LLAMA8B_LINEARS = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672),
                   ("down", 14336, 4096)]
KERNEL_FORMATS = {"gptq": quantization_config("gptq", 128),
                  "gptq-act-order": quantization_config("gptq", 128, desc_act=True),
                  "awq": quantization_config("awq", 128)}
# --time-budget: what a step needs left to start (else it is skipped, saying so)
NANO_RESERVE_S = 75     # the nano workload on an 8B model: ~20-40 s of prefill and decode
SWEEP_RESERVE_S = 150   # the sweep: ~50 compiled variants, then their timings
CHECK_RESERVE_S = 40    # one format's check: two small engines (load, choice, capture)
T0 = time.monotonic()


def time_left(args) -> float:
    """Seconds of --time-budget left (inf without one)."""
    return args.time_budget - (time.monotonic() - T0) if args.time_budget else float("inf")


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def timer(device: torch.device, repeats: int):
    """fn -> microseconds of one fn(): a CUDA-graph replay on the GPU, wall clock elsewhere."""
    if device.type == "cuda":
        return lambda fn: graph_time_us(fn, repeats)

    def wall(fn):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)
    return wall


# ---- layers --------------------------------------------------------------------------------

def reference_weight(q: QuantConfig, t: dict) -> torch.Tensor:
    if q.method == "gptq":
        return dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], q.zero_offset)
    return dequantize_awq(t["qweight"], t["qzeros"], t["scales"], q.group_size)


def quantized_copies(w: torch.Tensor, fmt: str, copies: int, device) -> tuple[list, int, torch.Tensor]:
    """`copies` distinct W4 tensors of w in `fmt`, bytes of one, the reference W [N, K] fp32."""
    q = QuantConfig.from_hf(KERNEL_FORMATS[fmt])
    perm = torch.randperm(w.shape[1], device=w.device) if q.desc_act else None
    t = {key.rsplit(".", 1)[1]: v.to(device) for key, v in quantized_tensors("x.weight", w, q, perm).items()}
    nbytes = sum(v.nbytes for v in t.values())
    ws = [w4a16.W4(t["qweight"].clone(), t["qzeros"].clone(), t["scales"].clone(),
                   t["g_idx"].clone() if "g_idx" in t else None, q.method == "awq",
                   q.group_size, q.desc_act, q.zero_offset) for _ in range(copies)]
    return ws, nbytes, reference_weight(q, t).float()


def time_launches(launches, x, ws, time_us) -> tuple[list, dict]:
    """[(us per layer, launch)] of the launches that run here, {name: why} of the others."""
    timed, failed = [], {}
    for launch in launches:
        try:
            us = time_us(lambda: [w4a16.w4a16_matmul(x, w, None, launch) for w in ws])
        except w4a16._LAUNCH_ERRORS as e:
            w4a16.device_still_sound(x.device)
            failed[w4a16._name(launch)] = type(e).__name__
            continue
        timed.append((us / len(ws), launch))
    return timed, failed


def bench_layers(args, shapes, ms, device, dtype, ceiling) -> list[dict]:
    """Per shape and M: cuBLAS bf16, and per format the load-time choice's candidates on the
    checkpoint layout (`fmt`, the old engine) and on the repacked one (`fmt+r`: the fma
    kernel at M = 1, the other kernels reading the repacked words)."""
    rows = []
    gen = torch.Generator(device).manual_seed(0)
    time_us = timer(device, args.repeats)
    sms = w4a16.num_sms(device)
    formats = args.kernel_formats.split(",")
    for name, k, n in shapes:
        w = torch.randn(n, k, generator=gen, device=device) * 0.02
        dense = [w.to(dtype).clone() for _ in range(args.copies)]
        packed = {}
        for fmt in formats:
            ws, nbytes, w_ref = quantized_copies(w, fmt, args.copies, device)
            packed[fmt] = ws, nbytes, w_ref
            packed[fmt + "+r"] = [w4a16.repack(x) for x in ws], nbytes, w_ref
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=device).to(dtype)
            row = {"layer": name, "k": k, "n": n, "m": m}
            row["bf16_us"] = time_us(lambda: [x @ d.t() for d in dense]) / len(dense)
            # the W4A16 launches as the engine's steps run them: with programmatic dependent
            # launch up to --pdl-rows rows (EngineConfig.pdl_max_tokens), as choose_w4a16 times them
            pdl.enable(pdl.supported(device) and m <= args.pdl_rows)
            row["pdl"] = pdl.enabled()
            row["bf16_GBps"] = dense[0].nbytes / row["bf16_us"] / 1e3
            for fmt, (ws, nbytes, w_ref) in packed.items():
                if (fmt.endswith("+r") and "repacked" not in args.layouts
                        or not fmt.endswith("+r") and "checkpoint" not in args.layouts):
                    continue
                launches = w4a16.candidates(m, n, k, sms, ws[0], dtype)
                if args.smoke:   # the default, one stream, fma, mma, slice tile (repacked), dequant
                    launches = [launches[0], *[l for l in launches if l.kind == "stream"][:1],
                                *[l for l in launches if l.kind == "fma"][:1],
                                *[l for l in launches if l.kind == "mma"][:1],
                                *[l for l in launches if l.kind == "slice"][:1], launches[-1]]
                timed, failed = time_launches(launches, x, ws, time_us)
                if pdl.enabled():   # as the load-time choice: the fastest again without the
                    more, more_failed = time_launches(   # weight prefetch and without PDL
                        w4a16.pdl_alternatives(timed), x, ws, time_us)
                    timed, failed = timed + more, {**failed, **more_failed}
                default_us = timed[0][0] if timed and timed[0][1] == launches[0] else float("nan")
                best_us, best = w4a16.pick(timed)
                ref = x.float() @ w_ref.t()
                y = w4a16.w4a16_matmul(x, ws[0], None, best).float()
                kinds, modes = {}, {}
                for t, l in timed:
                    kinds[l.kind] = min(t, kinds.get(l.kind, float("inf")))
                    if l.kind in w4a16.PDL_KINDS:
                        mode = ("off", "wait", "prefetch")[l.pdl]
                        modes[mode] = min(t, modes.get(mode, float("inf")))
                row[fmt] = {"us": best_us, "choice": w4a16._name(best), "default_us": default_us,
                            "fma_us": kinds.get("fma", float("nan")),
                            "mma_us": kinds.get("mma", float("nan")),
                            "kind_us": kinds, "pdl_mode_us": modes, "bytes": nbytes,
                            "GBps": nbytes / best_us / 1e3,
                            "pct_copy": 100 * nbytes / best_us * 1e6 / ceiling,
                            "err": ((y - ref).abs().max() / ref.abs().max()).item(),
                            "times_us": {w4a16._name(l): t for t, l in timed}, "failed": failed}
            pdl.enable(False)
            rows.append(row)
            print_candidates([row], ceiling, header=len(rows) == 1)   # as measured: a run cut
            sys.stdout.flush()                                         # short keeps its rows
            progress(f"layers {name} M={m}: bf16 {row['bf16_us']:.1f} us, "
                     + ", ".join(f"{f} {row[f]['us']:.1f} us ({row[f]['choice']})" for f in packed if f in row))
    return rows


def print_layers(rows, name, ceiling) -> None:
    fmts = [f for f in rows[0] if isinstance(rows[0][f], dict)] if rows else []
    print(f"\nW4A16 vs cuBLAS bf16 on {name} (copy ceiling {ceiling / 1e9:.0f} GB/s): us per layer "
          "(CUDA-graph replay over distinct copies) of the launch the load-time choice would take; "
          "<fmt> = checkpoint layout (the old kernels), <fmt>+r = repacked at load (+ the stream and "
          "fma kernels at M=1, the mma, swap and slice kernels at M<=64); vs bf16 = bf16 us / us; "
          "W4A16 at M <= " + str(max([r["m"] for r in rows if r.get("pdl")], default=0))
          + " with programmatic dependent launch")
    print(f"{'layer':>8} {'K':>6} {'N':>6} {'M':>4} {'bf16 us':>8} {'GB/s':>5} "
          + " ".join(f"{f + ' us':>16} {'GB/s':>5} {'%copy':>5} {'vs bf16':>7}" for f in fmts))
    for r in rows:
        print(f"{r['layer']:>8} {r['k']:>6} {r['n']:>6} {r['m']:>4} {r['bf16_us']:>8.1f} "
              f"{r['bf16_GBps']:>5.0f} "
              + " ".join(f"{r[f]['us']:>16.1f} {r[f]['GBps']:>5.0f} {r[f]['pct_copy']:>5.1f} "
                         f"{r['bf16_us'] / r[f]['us']:>6.2f}x" for f in fmts))
    print("choices: " + "; ".join(f"{r['layer']} M={r['m']}: " + ", ".join(
        f"{f} {r[f]['choice']}" for f in fmts) for r in rows))
    for kind in ("stream", "fma", "slice", "swap", "mma"):
        best = [(r['layer'], r['m'], f, r[f]["kind_us"][kind]) for r in rows for f in fmts
                if kind in r[f].get("kind_us", {})]
        if best:
            print(f"fastest {kind} tile: " + ", ".join(f"{l} M={m} {f} {t:.1f} us" for l, m, f, t in best))
    with_pdl = [(r, f) for r in rows if r.get("pdl") for f in fmts if r[f].get("pdl_mode_us")]
    if with_pdl:
        print("with PDL, the fastest stream/slice/swap/mma launch per mode (weight prefetch, wait "
              "only, PDL off), us: " + "; ".join(
                  f"{r['layer']} M={r['m']} {f}: " + ", ".join(
                      f"{mode} {r[f]['pdl_mode_us'][mode]:.1f}" for mode in ("prefetch", "wait", "off")
                      if mode in r[f]["pdl_mode_us"]) for r, f in with_pdl))
    for m in sorted({r["m"] for r in rows}):
        per = [r for r in rows if r["m"] == m]
        bf16 = sum(r["bf16_us"] for r in per)
        print(f"M={m}: one layer's 4 linears: bf16 {bf16:.1f} us, "
              + ", ".join(f"{f} {sum(r[f]['us'] for r in per):.1f} us "
                          f"({bf16 / sum(r[f]['us'] for r in per):.2f}x)" for f in fmts))
    print("max relative error vs the torch reference: "
          + ", ".join(f"{f} {max(r[f]['err'] for r in rows):.1e}" for f in fmts))
    failed = {k: v for r in rows for f in fmts for k, v in r[f]["failed"].items()}
    if failed:
        print("launches that did not run here (skipped): "
              + ", ".join(f"{k} ({v})" for k, v in sorted(failed.items())))


def summarize(paths: list[str]) -> None:
    """print_layers over the layers rows of saved outputs (runs cut short: what they have)."""
    rows, device, ceiling = [], None, float("nan")
    for path in paths:
        lines = []
        if os.path.exists(path):
            with open(path) as f:
                lines = [line for line in f if line.startswith("{")]
        if not lines:
            print(f"{path}: no JSON line (the run did not finish)")
            continue
        out = json.loads(lines[-1])
        rows += out.get("layers", [])
        device, ceiling = out["device"], out["copy_GBps"] * 1e9
    if rows:
        print_layers(rows, device, ceiling)


def print_candidates(rows, ceiling, header: bool = True) -> None:
    """Every timed candidate per shape, M and format, fastest first: us per layer, GB/s of
    the packed weights (qweight, qzeros, scales, g_idx), % of the copy ceiling, and cuBLAS
    bf16 on the same line."""
    if header:
        print("\nW4A16 candidates per shape (fastest first; * = the load-time choice): us per "
              "layer, packed-weight GB/s, % of the copy ceiling; bf16 = cuBLAS on the dense weight")
        print(f"{'layer':>8} {'M':>4} {'format':>14} {'candidate':>22} {'us':>7} {'GB/s':>6} "
              f"{'%copy':>6} {'bf16 us':>8} {'bf16 GB/s':>9} {'vs bf16':>8}")
    for r in rows:
        for f in [f for f in r if isinstance(r[f], dict)]:
            nbytes = r[f]["bytes"]
            for name, us in sorted(r[f]["times_us"].items(), key=lambda t: t[1]):
                mark = "*" if name == r[f]["choice"] else " "
                print(f"{r['layer']:>8} {r['m']:>4} {f:>14} {mark + name:>22} {us:>7.1f} "
                      f"{nbytes / us / 1e3:>6.0f} {100 * nbytes / us * 1e6 / ceiling:>6.1f} "
                      f"{r['bf16_us']:>8.1f} {r['bf16_GBps']:>9.0f} {r['bf16_us'] / us:>7.2f}x")


# ---- sweep -----------------------------------------------------------------------------------

def sweep_launches(m: int, n: int, k: int, sms: int) -> list:
    if m <= w4a16.MAX_M:
        out = []
        kinds = ("skinny", "gemv") if m <= w4a16.GEMV_MAX_M else ("skinny",)
        for kind in kinds:
            for bn in (128, 256):
                for bk in (64, 128):
                    for warps, stages in ((4, 4), (8, 4)):
                        tile = w4a16.Launch(kind, bn, bk, warps, stages)
                        out += [tile._replace(split_k=s)
                                for s in w4a16.split_candidates(n, k, tile, sms)]
        return out
    return [w4a16.Launch("tiled", bn, 64, warps, stages, block_m=bm)
            for bm in (64, 128) for bn in (64, 128, 256)
            for warps, stages in ((4, 3), (8, 3), (8, 4))]


def bench_sweep(args, shapes, ms, device, dtype) -> list[dict]:
    """GPTQ: every sweep_launches config per shape and M; the fastest three and what failed."""
    rows = []
    gen = torch.Generator(device).manual_seed(1)
    time_us = timer(device, args.repeats)
    sms = w4a16.num_sms(device)
    for name, k, n in shapes:
        w = torch.randn(n, k, generator=gen, device=device) * 0.02
        ws, _, _ = quantized_copies(w, "gptq", args.copies, device)
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=device).to(dtype)
            timed, failed = time_launches(sweep_launches(m, n, k, sms), x,
                                          ws if m <= w4a16.MAX_M else ws[:4], time_us)
            timed.sort(key=lambda t: t[0])
            rows.append({"layer": name, "m": m, "best": [(w4a16._name(l), t) for t, l in timed[:3]],
                         "tried": len(timed) + len(failed), "failed": failed})
            progress(f"sweep {name} M={m}: best {rows[-1]['best'][:1]}, {len(failed)} skipped")
    return rows


def print_sweep(rows) -> None:
    print("\nsweep (GPTQ group 128): the fastest launches per shape and M, us per layer")
    for r in rows:
        best = ", ".join(f"{c} {t:.1f}" for c, t in r["best"])
        why = sorted(set(r["failed"].values()))
        skipped = f"; {len(r['failed'])} of {r['tried']} skipped ({', '.join(why)})" if why else ""
        print(f"{r['layer']:>8} M={r['m']:<5} {best}{skipped}")


# ---- engine ----------------------------------------------------------------------------------

def checkpoint(model: str, fmt: str, dtype: str, smoke: bool) -> str:
    path = os.path.join(tempfile.gettempdir(), f"twinserve-{model}-{fmt}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        config = tiny_config("llama", vocab_size=10240) if model.startswith("tiny") else model
        qc = None if fmt == "bf16" else KERNEL_FORMATS[fmt]
        progress(f"writing random checkpoint {model} ({fmt}) -> {path}")
        if qc is not None and smoke:
            qc = {**qc, "group_size": 32}
        write_random_checkpoint(config, path, dtype=dtype, quantization=qc, progress=False)
    return path


def prefill_step(llm: LLM, tokens: int, repeats: int) -> dict:
    """Median device time of a step that prefills one `tokens`-token prompt."""
    rows = []
    for i in range(repeats):
        start = len(llm.step_records)
        prompt = [(13 * j + i) % 10000 + 3 for j in range(tokens)]
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                     use_tqdm=False)
        rows += [r for r in llm.step_records[start:] if r["num_prefill_tokens"] == tokens]
    if not rows:
        return {"tokens": tokens, "steps": 0}
    return {"tokens": tokens, "steps": len(rows),
            "device_ms": statistics.median(r["device_s"] for r in rows) * 1e3,
            "launch_ms": statistics.median(r["duration_s"] for r in rows) * 1e3}


def choices_by_shape(report: list[dict]) -> dict[str, str]:
    """'N x K' -> 'M1-8 choice, M16-64 choice, ...' (runs of equal choices)."""
    names = {(n, k): name for name, k, n in LLAMA8B_LINEARS}
    out = {}
    for r in report:
        key = f"{names.get((r['n'], r['k']), '')} {r['n']}x{r['k']}".strip()
        out.setdefault(key, []).append((r["m"], r["choice"]))
    text = {}
    for key, plan in out.items():
        runs = []
        for m, choice in plan:
            if runs and runs[-1][2] == choice:
                runs[-1][1] = m
            else:
                runs.append([m, m, choice])
        text[key] = ", ".join(f"M{a}{'' if a == b else f'-{b}'} {c}" for a, b, c in runs)
    return text


def plan_rows(model) -> list[dict]:
    """The W4A16 launch each quantized layer shape runs per row count (its `w4a16` plan,
    timed at start or read from a kernel plan), as choose_w4a16's report rows."""
    return [dict(n=n, k=k, m=m, choice=w4a16.launch_name(launch))
            for (n, k, *_), layers in w4a16.quantized_layers(model).items()
            for m, launch in getattr(layers[0], "w4a16", ())]


def bench_engine(args, fmt: str, extra: dict, ceiling: float) -> dict:
    path = checkpoint(args.model, fmt, "float32" if "device" in extra else "bfloat16", args.smoke)
    plan = args.kernel_plan.replace("{format}", fmt) if args.kernel_plan else None
    read = bool(plan) and os.path.exists(plan)
    progress(f"engine {fmt}: loading {path} (with the W4A16 choice"
             + (f" read from {plan})" if read else ", timed)"))
    start = time.monotonic()
    llm = LLM(path, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, kernel_plan=plan, **extra)
    runner = llm.model_runner
    result = {"format": fmt, "load_s": time.monotonic() - start, "kernel_plan": plan,
              "kernel_plan_read": read, "choices": choices_by_shape(plan_rows(runner.model))}
    progress(f"engine {fmt}: loaded in {result['load_s']:.0f} s")
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_per_token = sum(layer.k_cache[0, 0].numel() * 2 * layer.k_cache.element_size()
                       for layer in runner.model.attention_layers())
    llm.generate([[5] * 16], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    result.update(weight_GB=weight_bytes / 1e9, kv_blocks=runner.num_blocks,
                  kv_tokens=runner.num_blocks * llm.config.block_size, decode=[],
                  memory_GB={k: v / 1e9 for k, v in runner.memory.items() if k != "utilization"})
    for batch in map(int, args.decode_batches.split(",")):
        b = decode_breakdown(llm, batch, args.decode_context, 16)
        if b["steps"] and ceiling == ceiling:
            nbytes = weight_bytes + kv_per_token * batch * args.decode_context
            b["pct_of_copy"] = 100 * nbytes / (b["device_ms"] / 1e3) / ceiling
        result["decode"].append(b)
        progress(f"engine {fmt}: decode batch {batch}: {b.get('device_ms', float('nan')):.3f} ms")
    result["prefill"] = prefill_step(llm, args.prefill_tokens, 3)
    progress(f"engine {fmt}: prefill {args.prefill_tokens}: "
             f"{result['prefill'].get('device_ms', float('nan')):.2f} ms device")
    if args.nano:
        left = time_left(args)
        if left < NANO_RESERVE_S:
            result["nano_skipped"] = f"{left:.0f} s of --time-budget left < {NANO_RESERVE_S} s"
            progress(f"engine {fmt}: nano workload skipped ({result['nano_skipped']})")
        else:
            prompts, params = nano_workload(args.num_seqs, args.max_input_len, args.max_output_len)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            result["nano_tok_per_s"] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
            progress(f"engine {fmt}: nano workload {result['nano_tok_per_s']:,.0f} tok/s")
    llm.close()
    return result


def read_reference(path: str) -> dict | None:
    """The bf16 engine result of a saved bench_quant output (its last JSON line)."""
    with open(path) as f:
        lines = [line for line in f if line.startswith("{")]
    if not lines:
        raise SystemExit(f"--reference {path}: no JSON line (a bench_quant.py output)")
    engines = json.loads(lines[-1]).get("engine", [])
    ref = next((e for e in engines if e["format"] == "bf16"), None)
    if ref is None:
        raise SystemExit(f"--reference {path}: no bf16 engine result in its JSON line")
    return ref


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b and b else "-"


def print_engine(res: dict, base: dict | None, name: str, args) -> None:
    """One format's rows (printed as soon as it is measured); ratios are bf16 / this format
    (>1: faster), on device time."""
    by_batch = {b["batch"]: b for b in (base or {}).get("decode", []) if b.get("steps")}
    if res.get("choices"):
        source = f"read from {res['kernel_plan']}" if res.get("kernel_plan_read") else "timed"
        print(f"\n{res['format']} load-time W4A16 choice ({source}; load {res['load_s']:.0f} s):")
        for shape, text in res["choices"].items():
            print(f"  {shape}: {text}")
    print(f"{'format':>15} {'weights GB':>11} {'KV tokens':>10} {'batch':>6} {'step ms':>8} "
          f"{'device ms':>10} {'tok/s':>9} {'% copy':>7} {'vs bf16':>8}")
    for b in res["decode"]:
        if not b["steps"]:
            continue
        ref = by_batch.get(b["batch"], {}).get("device_ms", float("nan"))
        print(f"{res['format']:>15} {res['weight_GB']:>11.2f} {res['kv_tokens']:>10,} "
              f"{b['batch']:>6} {b['step_ms']:>8.3f} {b['device_ms']:>10.3f} "
              f"{b['tok_per_s']:>9.0f} {b.get('pct_of_copy', float('nan')):>6.1f}% "
              f"{ratio(ref, b['device_ms']):>8}")
    if res.get("memory_GB"):   # where the memory went when the KV pool was sized (ModelRunner.memory)
        print(f"{res['format']:>15} memory GB at KV sizing: "
              + ", ".join(f"{k} {v:.2f}" for k, v in res["memory_GB"].items()))
    p = res["prefill"]
    if p["steps"]:
        ref = (base or {}).get("prefill", {}).get("device_ms", float("nan"))
        print(f"{res['format']:>15} {'':>11} {'':>10} {'P' + str(p['tokens']):>6} {'':>8} "
              f"{p['device_ms']:>10.3f} {'':>9} {'':>7} {ratio(ref, p['device_ms']):>8}")
    if "nano_tok_per_s" in res:
        ref = (base or {}).get("nano_tok_per_s", float("nan"))
        print(f"{res['format']:>15} nano-vLLM workload: {res['nano_tok_per_s']:,.0f} tok/s "
              f"({ratio(res['nano_tok_per_s'], ref)} bf16)")
    elif "nano_skipped" in res:
        print(f"{res['format']:>15} nano-vLLM workload skipped: {res['nano_skipped']}")
    sys.stdout.flush()


# ---- pin ------------------------------------------------------------------------------------

def pin_format(args, fmt: str, extra: dict) -> dict:
    """Two engines of `fmt` on one fresh kernel plan: the first times and writes it, the
    second reads it (timing nothing): load seconds, launches, greedy tokens, decode steps."""
    from engine import kernel_plan
    path = checkpoint(args.model, fmt, extra.get("dtype", "bfloat16"), args.smoke)
    plan = os.path.join(tempfile.mkdtemp(prefix="twinserve-pin-"), "plan.json")
    prompts = [[(31 * i + 7 * j) % 10000 + 3 for j in range(20 + 13 * i)] for i in range(16)]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    batches, runs = [int(b) for b in args.decode_batches.split(",")][:2], []
    for role in ("timed", "pinned"):
        start = time.monotonic()
        with LLM(path, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                 max_num_batched_tokens=args.max_num_batched_tokens,
                 gpu_memory_utilization=args.gpu_memory_utilization, kernel_plan=plan, **extra) as llm:
            load_s = time.monotonic() - start
            runner = llm.model_runner
            launches = kernel_plan.describe(kernel_plan.snapshot(runner.model, device=""))
            tokens = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            decode = {b: decode_breakdown(llm, b, args.decode_context, 16).get("device_ms", float("nan"))
                      for b in batches}
        runs.append(dict(role=role, load_s=load_s, timed_rows=len(runner.quant_report), launches=launches,
                         tokens=tokens, decode_ms=decode))
        progress(f"pin {fmt}: {role} engine: load {load_s:.1f} s, decode {decode} ms")
    timed, pinned = runs
    return {"format": fmt, "plan_written": os.path.exists(plan),
            "load_s": [r["load_s"] for r in runs], "pinned_timed_rows": pinned["timed_rows"],
            "w4a16_launches": sum(k.startswith("w4a16 ") for k in timed["launches"]),
            "same_launches": timed["launches"] == pinned["launches"],
            "same_tokens": timed["tokens"] == pinned["tokens"],
            "decode_ms": {b: [r["decode_ms"][b] for r in runs] for b in batches}}


def print_pin(rows, name) -> None:
    print(f"\nkernel plan on {name}: engine 1 times and writes the plan, engine 2 reads it")
    print(f"{'format':>15} {'load s 1':>9} {'load s 2':>9} {'rows timed 2':>13} {'w4a16 launches':>15} "
          f"{'same launches':>14} {'same tokens':>12}"
          + "".join(f"{f'B={b} ms 1/2':>16}" for b in rows[0]["decode_ms"]))
    for r in rows:
        print(f"{r['format']:>15} {r['load_s'][0]:>9.1f} {r['load_s'][1]:>9.1f} {r['pinned_timed_rows']:>13} "
              f"{r['w4a16_launches']:>15} {str(r['same_launches']):>14} {str(r['same_tokens']):>12}"
              + "".join(f" {a:>7.3f}/{b:<7.3f}" for a, b in r["decode_ms"].values()))
    sys.stdout.flush()


# ---- check -----------------------------------------------------------------------------------

def check_format(fmt: str, extra: dict, smoke: bool) -> dict:
    """Greedy tokens of a small quantized Llama against its dequantized twin (same dtype)."""
    root = os.path.join(tempfile.gettempdir(), f"twinserve-check-{fmt}")
    dims = (dict(hidden_size=64, intermediate_size=128) if smoke else
            dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=128, num_hidden_layers=4))
    config = tiny_config("llama", vocab_size=10240, **dims)
    qc = {**KERNEL_FORMATS[fmt], "group_size": 32 if smoke else 128}
    dtype = extra.get("dtype", "bfloat16")
    quantized = write_random_checkpoint(config, os.path.join(root, "q"), dtype=dtype, std=0.05,
                                        progress=False, quantization=qc)
    dense = write_dequantized_checkpoint(quantized, os.path.join(root, "dense"), dtype)
    prompts = [[(31 * i + 7 * j) % 10000 + 3 for j in range(20 + 13 * i)] for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = []
    for path in (quantized, dense):
        with LLM(str(path), max_model_len=512, max_num_seqs=16, **extra) as llm:
            outs.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    pairs = [(a, b) for sa, sb in zip(*outs) for a, b in zip(sa, sb)]
    progress(f"check {fmt} done")
    return {"format": fmt, "seqs": len(prompts),
            "equal_seqs": sum(a == b for a, b in zip(*outs)),
            "equal_tokens": sum(a == b for a, b in pairs) / len(pairs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--stages", default="layers,engine,check")
    ap.add_argument("--sweep", action="store_true", help="layers: the tile / split grid (GPTQ)")
    ap.add_argument("--formats", default="bf16,gptq,awq",
                    help="engine stage: bf16, gptq, gptq-act-order, awq")
    ap.add_argument("--reference", help="engine: a saved bench_quant output with bf16 engine "
                    "figures to compare against (e.g. benchmarks/raw/h200_quant_engine_bf16.txt)")
    ap.add_argument("--time-budget", type=float, default=0,
                    help="seconds for the whole run (0: none): the nano workload, the sweep "
                    "and each check format are skipped when less than they need is left")
    ap.add_argument("--copies", type=int, default=8, help="layers: distinct copies per shape")
    ap.add_argument("--kernel-formats", default="gptq,awq,gptq-act-order",
                    help="layers: formats (each on the checkpoint and the repacked layout)")
    ap.add_argument("--layer-m", default="1,16,32,64,256,2048", help="layers: row counts")
    ap.add_argument("--layers", default=",".join(n for n, _, _ in LLAMA8B_LINEARS),
                    help="layers: which Llama-3.1-8B linear shapes (qkv, o, gate_up, down)")
    ap.add_argument("--summarize", nargs="+", metavar="OUTPUT",
                    help="print the layers summary over the rows of saved bench_quant outputs "
                    "(their last JSON lines; e.g. one run per shape), then exit")
    ap.add_argument("--pdl-rows", type=int, default=32,
                    help="layers: W4A16 launches at up to this many rows are timed with "
                    "programmatic dependent launch (sm_90+), as the engine runs them "
                    "(EngineConfig.pdl_max_tokens; 0: none)")
    ap.add_argument("--layouts", default="checkpoint,repacked",
                    help="layers: the weight layouts to time (checkpoint: the kernels reading "
                    "the published tensors; repacked: as the engine loads them, <fmt>+r)")
    ap.add_argument("--decode-batches", default="1,16,64,256")
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--nano", action="store_true", help="also nano-vLLM's bench workload")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--kernel-plan", help="engine: EngineConfig.kernel_plan of each format's "
                    "engine, {format} in the path replaced by the format (a file per model): "
                    "written by the first run that names it, read by the others")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; CPU when no GPU")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    stages = args.stages.split(",")
    unknown = set(stages) - {"layers", "engine", "check", "pin"}
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}: layers, engine, check, pin")
    formats = args.formats.split(",")
    if set(formats) - {"bf16", *KERNEL_FORMATS}:
        ap.error(f"unknown format(s) in --formats {args.formats}: bf16, {', '.join(KERNEL_FORMATS)}")
    if args.kernel_plan and len(formats) > 1 and "{format}" not in args.kernel_plan:
        ap.error(f"--kernel-plan {args.kernel_plan} names one file for {len(formats)} formats "
                 "(each a different model): put {format} in the path")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    picked = args.layers.split(",")
    if set(picked) - {n for n, _, _ in LLAMA8B_LINEARS}:
        ap.error(f"unknown layer(s) in --layers {args.layers}: "
                 f"{', '.join(n for n, _, _ in LLAMA8B_LINEARS)}")
    shapes = [shape for shape in LLAMA8B_LINEARS if shape[0] in picked]
    ms, dtype, extra = [int(m) for m in args.layer_m.split(",")], torch.bfloat16, {}
    sweep_ms = [1, 16, 64, 2048]
    if args.smoke:
        shapes = [shape for shape in [("qkv", 128, 96), ("down", 256, 64)] if shape[0] in picked]
        ms, sweep_ms = [1, 70], [1]
        args.repeats, args.copies = 1, 1
        args.model = "tiny-llama" if args.model == "llama-3.1-8b" else args.model
        args.decode_batches, args.decode_context, args.prefill_tokens = "1,4", 32, 64
        args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens = 256, 8, 512
        args.num_seqs, args.max_input_len, args.max_output_len = 4, 120, 110
        if not cuda:
            dtype, extra = torch.float32, dict(device="cpu", dtype="float32", num_gpu_blocks=128)
    if cuda and not extra:
        extra = dict(dtype="bfloat16")
    ceiling = copy_bandwidth() if cuda else float("nan")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    out = {"bench": "quant", "device": name, "model": args.model, "copy_GBps": ceiling / 1e9}

    if "layers" in stages:
        out["layers"] = bench_layers(args, shapes, ms, device, dtype, ceiling)
        print_layers(out["layers"], name, ceiling)
        sys.stdout.flush()
    if "check" in stages:
        out["check"] = []
        for fmt in KERNEL_FORMATS:
            if time_left(args) < CHECK_RESERVE_S:
                out["check"].append({"format": fmt, "skipped": f"{time_left(args):.0f} s left"})
                progress(f"check {fmt} skipped: {time_left(args):.0f} s of --time-budget left")
            else:
                out["check"].append(check_format(fmt, extra, args.smoke))
        print(f"\nbf16 check on {name}: quantized engine vs its dequantized twin, greedy")
        print(f"{'format':>15} {'equal tokens':>13} {'equal sequences':>16}")
        for c in out["check"]:
            if "skipped" in c:
                print(f"{c['format']:>15} skipped ({c['skipped']} of --time-budget)")
                continue
            print(f"{c['format']:>15} {100 * c['equal_tokens']:>12.1f}% "
                  f"{c['equal_seqs']:>10}/{c['seqs']}")
        sys.stdout.flush()
    if "layers" in stages:   # the sweep last of the kernel stages: tuning, not a result
        if args.sweep and time_left(args) < SWEEP_RESERVE_S:
            out["sweep_skipped"] = f"{time_left(args):.0f} s of --time-budget left"
            print(f"\nsweep skipped: {out['sweep_skipped']} < {SWEEP_RESERVE_S} s")
        elif args.sweep:
            out["sweep"] = bench_sweep(args, shapes, sweep_ms, device, dtype)
            print_sweep(out["sweep"])
        sys.stdout.flush()
    if "pin" in stages:
        out["pin"] = []
        for fmt in formats:     # a row per format as it finishes: a time limit keeps the done ones
            out["pin"].append(pin_format(args, fmt, extra))
            print_pin(out["pin"][-1:], name)
            sys.stdout.flush()
    if "engine" in stages:
        base = read_reference(args.reference) if args.reference else None
        print(f"\nengine on {name}: {args.model}, decode at context ~{args.decode_context} "
              "(median step), prefill of one prompt (device time); vs bf16"
              + (f" from {args.reference}" if args.reference and "bf16" not in formats else ""))
        out["engine"] = []
        for fmt in formats:
            res = bench_engine(args, fmt, extra, ceiling)
            out["engine"].append(res)
            if fmt == "bf16":
                base = res
            print_engine(res, base, name, args)
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
