"""4-bit weights against bf16: the W4A16 kernels per linear layer, and the engine's decode
step, prefill and KV pool, for Llama-3.1-8B in bf16, GPTQ and AWQ (random weights in the
published layouts, engine.checkpoint --quantization).

    python benchmarks/bench_quant.py                          # H200: all stages, ~5-8 min
    python benchmarks/bench_quant.py --stages layers           # kernels only (~1 min)
    python benchmarks/bench_quant.py --formats bf16,gptq --nano
    python benchmarks/bench_quant.py --smoke                  # tiny shapes on the CPU: it runs

Stages:
  layers  each Llama-3.1-8B linear shape (qkv, o, gate_up, down) at M = 1, 16, 64, 256, 2048:
          torch bf16 matmul vs the W4A16 kernel on GPTQ (group 128), GPTQ act-order and AWQ
          tensors; median device time (CUDA events) and the weight bytes read per second
          against the measured copy ceiling (a 1 GiB device-to-device copy).
  engine  per format: the median decode step at batch 1, 16, 64, 256 (context ~1k, CUDA
          graphs as served), one 2,048-token prefill step, the weight bytes and the KV pool
          the engine sized from the memory left (engine figures: bench_engine.decode_breakdown).
  nano    (--nano) nano-vLLM's bench workload throughput per format.
  check   bf16 correctness on the device: a small Llama (hidden 1024, 4 layers) per format
          against its dequantized bf16 twin (engine.checkpoint.write_dequantized_checkpoint),
          greedy, 16 prompts x 32 tokens: the share of equal tokens and of equal sequences.
          Both run dot(x bf16, W bf16) with fp32 accumulation, W being the same dequantized
          values rounded to bf16; only the accumulation order differs, so tokens agree
          except where two logits nearly tie (random weights make near-ties common).
The layers stage also reports each kernel's error against the torch reference
(max |y - y_ref| / max |y_ref|, y_ref = x @ dequantized W in bf16); --sweep also times
the GPTQ kernel over a grid of tile sizes and prints the fastest per shape.
Prints tables, then one line of JSON.
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
from engine.layers.quant import dequantize_awq, dequantize_gptq  # noqa: E402
from engine.kernels.w4a16 import w4a16_matmul  # noqa: E402
from policy.quantization import QuantConfig  # noqa: E402

# (name, in_features, out_features) of one Llama-3.1-8B layer's linears, fused as the engine runs them
LLAMA8B_LINEARS = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672),
                   ("down", 14336, 4096)]
KERNEL_FORMATS = {"gptq": quantization_config("gptq", 128),
                  "gptq-act-order": quantization_config("gptq", 128, desc_act=True),
                  "awq": quantization_config("awq", 128)}


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn(): CUDA events on the GPU, wall clock elsewhere."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def reference_weight(q: QuantConfig, t: dict) -> torch.Tensor:
    if q.method == "gptq":
        return dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], q.zero_offset)
    return dequantize_awq(t["qweight"], t["qzeros"], t["scales"], q.group_size)


def sweep_configs(m: int) -> list[dict]:
    if m <= 32:
        return [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, SPLIT_K=s, num_warps=w)
                for n in (64, 128, 256) for k in (64, 128) for s in (1, 2, 4, 8, 16)
                for w in (4,)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, SPLIT_K=1, num_warps=w, num_stages=st)
            for bm in (64, 128) for bn in (64, 128, 256) for w in (4, 8) for st in (3, 4)]


def bench_layers(shapes, ms, device, dtype, repeats: int, ceiling: float,
                 sweep: bool = False) -> list[dict]:
    rows = []
    gen = torch.Generator(device).manual_seed(0)
    for name, k, n in shapes:
        w = torch.randn(n, k, generator=gen, device=device) * 0.02
        dense = w.to(dtype)
        packed = {}
        for fmt, qc in KERNEL_FORMATS.items():
            q = QuantConfig.from_hf(qc)
            perm = torch.randperm(k, device=device) if q.desc_act else None
            t = {key.rsplit(".", 1)[1]: v.to(device)
                 for key, v in quantized_tensors("x.weight", w, q, perm).items()}
            packed[fmt] = (q, t, sum(v.nbytes for v in t.values()),
                           reference_weight(q, t).to(dtype))
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=device).to(dtype)
            row = {"layer": name, "k": k, "n": n, "m": m}
            row["bf16_ms"] = time_ms(lambda: x @ dense.t(), device, repeats)
            row["bf16_GBps"] = dense.nbytes / row["bf16_ms"] / 1e6
            for fmt, (q, t, nbytes, w_ref) in packed.items():
                call = lambda cfg=None: w4a16_matmul(  # noqa: E731
                    x, t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), q.method,
                    q.group_size, q.desc_act, q.zero_offset, cfg)
                row[f"{fmt}_ms"] = time_ms(call, device, repeats)
                row[f"{fmt}_GBps"] = nbytes / row[f"{fmt}_ms"] / 1e6
                ref = (x @ w_ref.t()).float()
                row[f"{fmt}_err"] = ((call().float() - ref).abs().max() / ref.abs().max()).item()
                if sweep and fmt == "gptq":
                    timed = [(time_ms(lambda: call(cfg), device, repeats), cfg)
                             for cfg in sweep_configs(m)]
                    best_ms, best = min(timed, key=lambda p: p[0])
                    row["sweep_best_ms"], row["sweep_best"] = best_ms, best
            row["pct_copy_gptq"] = 100 * row["gptq_GBps"] * 1e9 / ceiling
            rows.append(row)
    return rows


def checkpoint(model: str, fmt: str, dtype: str, smoke: bool) -> str:
    path = os.path.join(tempfile.gettempdir(), f"twinserve-{model}-{fmt}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        config = tiny_config("llama", vocab_size=10240) if model.startswith("tiny") else model
        qc = None if fmt == "bf16" else KERNEL_FORMATS[fmt]
        print(f"writing random checkpoint {model} ({fmt}) -> {path}", file=sys.stderr)
        group = 32 if smoke else 128
        if qc is not None and smoke:
            qc = {**qc, "group_size": group}
        write_random_checkpoint(config, path, dtype=dtype, quantization=qc)
    return path


def prefill_step(llm: LLM, tokens: int, repeats: int) -> dict:
    """Median step with one `tokens`-token prompt prefilled in one step."""
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
            "step_ms": statistics.median(r["duration_s"] for r in rows) * 1e3,
            "device_ms": statistics.median(r["device_s"] for r in rows) * 1e3}


def bench_engine(args, fmt: str, extra: dict, ceiling: float) -> dict:
    path = checkpoint(args.model, fmt, "float32" if "device" in extra else "bfloat16", args.smoke)
    llm = LLM(path, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, **extra)
    runner = llm.model_runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_per_token = sum(layer.k_cache[0, 0].numel() * 2 * layer.k_cache.element_size()
                       for layer in runner.model.attention_layers())
    llm.generate([[5] * 16], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    result = {"format": fmt, "weight_GB": weight_bytes / 1e9, "kv_blocks": runner.num_blocks,
              "kv_tokens": runner.num_blocks * llm.config.block_size}
    result["decode"] = [decode_breakdown(llm, b, args.decode_context, 16)
                        for b in map(int, args.decode_batches.split(","))]
    for b in result["decode"]:
        if b["steps"] and ceiling == ceiling:
            nbytes = weight_bytes + kv_per_token * b["batch"] * args.decode_context
            b["pct_of_copy"] = 100 * nbytes / (b["device_ms"] / 1e3) / ceiling
    result["prefill"] = prefill_step(llm, args.prefill_tokens, 3)
    if args.nano:
        prompts, params = nano_workload(args.num_seqs, args.max_input_len, args.max_output_len)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        result["nano_tok_per_s"] = sum(len(o.token_ids) for o in outs) / seconds
    llm.close()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--stages", default="layers,engine,check")
    ap.add_argument("--sweep", action="store_true", help="layers: tile-size grid for GPTQ")
    ap.add_argument("--formats", default="bf16,gptq,awq",
                    help="engine stage: bf16, gptq, gptq-act-order, awq")
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
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; CPU when no GPU")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shapes, ms, dtype, extra = LLAMA8B_LINEARS, [1, 16, 64, 256, 2048], torch.bfloat16, {}
    if args.smoke:
        shapes, ms, args.repeats = [("qkv", 128, 96), ("down", 256, 64)], [1, 40], 2
        args.model = "tiny-llama" if args.model == "llama-3.1-8b" else args.model
        args.decode_batches, args.decode_context, args.prefill_tokens = "1,4", 32, 64
        args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens = 256, 8, 512
        args.num_seqs, args.max_input_len, args.max_output_len = 4, 120, 110
        if not cuda:
            dtype, extra = torch.float32, dict(device="cpu", dtype="float32", num_gpu_blocks=128)
    if cuda and not extra:
        extra = dict(dtype="bfloat16")
    stages = args.stages.split(",")
    ceiling = copy_bandwidth() if cuda else float("nan")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    out = {"bench": "quant", "device": name, "model": args.model, "copy_GBps": ceiling / 1e9}

    if "layers" in stages:
        rows = bench_layers(shapes, ms, device, dtype, args.repeats, ceiling, args.sweep)
        out["layers"] = rows
        print(f"\nW4A16 kernel vs bf16 matmul on {name} (copy ceiling {ceiling / 1e9:.0f} GB/s); "
              "ms and weight GB/s")
        fmts = list(KERNEL_FORMATS)
        print(f"{'layer':>8} {'K':>6} {'N':>6} {'M':>5} {'bf16 ms':>8} "
              + " ".join(f"{f + ' ms':>18}" for f in fmts)
              + f" {'bf16 GB/s':>10} {'gptq GB/s':>10} {'speedup':>8}")
        for r in rows:
            print(f"{r['layer']:>8} {r['k']:>6} {r['n']:>6} {r['m']:>5} {r['bf16_ms']:>8.3f} "
                  + " ".join(f"{r[f + '_ms']:>18.3f}" for f in fmts)
                  + f" {r['bf16_GBps']:>10.0f} {r['gptq_GBps']:>10.0f}"
                  f" {r['bf16_ms'] / r['gptq_ms']:>7.2f}x")
        print("max relative error vs the torch reference: "
              + ", ".join(f"{f} {max(r[f + '_err'] for r in rows):.1e}" for f in fmts))
        for r in rows:
            if "sweep_best" in r:
                print(f"sweep {r['layer']} M={r['m']}: best {r['sweep_best_ms']:.3f} ms "
                      f"(default {r['gptq_ms']:.3f}) with {r['sweep_best']}")

    if "engine" in stages:
        results = [bench_engine(args, fmt, extra, ceiling) for fmt in args.formats.split(",")]
        out["engine"] = results
        base = {b["batch"]: b for b in results[0]["decode"]}
        print(f"\nengine on {name}: {args.model}, decode at context ~{args.decode_context} "
              "(median step), prefill of one prompt")
        print(f"{'format':>15} {'weights GB':>11} {'KV tokens':>10} {'batch':>6} {'step ms':>8} "
              f"{'device ms':>10} {'tok/s':>9} {'% copy':>7} {'vs ' + results[0]['format']:>8}")
        for res in results:
            for b in res["decode"]:
                if not b["steps"]:
                    continue
                ref = base.get(b["batch"], {}).get("step_ms", float("nan"))
                print(f"{res['format']:>15} {res['weight_GB']:>11.2f} {res['kv_tokens']:>10,} "
                      f"{b['batch']:>6} {b['step_ms']:>8.3f} {b['device_ms']:>10.3f} "
                      f"{b['tok_per_s']:>9.0f} {b.get('pct_of_copy', float('nan')):>6.1f}% "
                      f"{ref / b['step_ms']:>7.2f}x")
            p = res["prefill"]
            if p["steps"]:
                ref = results[0]["prefill"].get("step_ms", float("nan"))
                print(f"{res['format']:>15} {'':>11} {'':>10} {'P' + str(p['tokens']):>6} "
                      f"{p['step_ms']:>8.3f} {p['device_ms']:>10.3f} {'':>9} {'':>7} "
                      f"{ref / p['step_ms']:>7.2f}x")
            if "nano_tok_per_s" in res:
                print(f"{res['format']:>15} nano-vLLM workload: {res['nano_tok_per_s']:,.0f} tok/s")
    if "check" in stages:
        out["check"] = [check_format(fmt, extra, args.smoke)
                        for fmt in ("gptq", "gptq-act-order", "awq")]
        print(f"\nbf16 check on {name}: quantized engine vs its dequantized twin, greedy")
        print(f"{'format':>15} {'equal tokens':>13} {'equal sequences':>16}")
        for c in out["check"]:
            print(f"{c['format']:>15} {100 * c['equal_tokens']:>12.1f}% "
                  f"{c['equal_seqs']:>10}/{c['seqs']}")
    print(json.dumps(out, default=float))


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
    return {"format": fmt, "seqs": len(prompts),
            "equal_seqs": sum(a == b for a, b in zip(*outs)),
            "equal_tokens": sum(a == b for a, b in pairs) / len(pairs)}


if __name__ == "__main__":
    main()
