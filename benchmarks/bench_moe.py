"""Mixture-of-experts engine throughput against its memory floor (default Qwen3-30B-A3B).

    python benchmarks/bench_moe.py                         # qwen3-30b-a3b, all 48 layers, CUDA
    python benchmarks/bench_moe.py --tensor-parallel-size 2   # the same over 2 GPUs
    python benchmarks/bench_moe.py --num-layers 16         # a third of the layers
    python benchmarks/bench_moe.py --model mixtral-8x7b --tp 2
    python benchmarks/bench_moe.py --kernel-plan /tmp/moe-plan.json   # A/B runs on one tile choice
    python benchmarks/bench_moe.py --smoke                 # tiny Qwen3-MoE on the CPU: it runs

Weights: a conf/model name gets random weights drawn on each GPU at load time
(`python -m engine.checkpoint --draw-at-load`: Qwen3-30B-A3B's 61 GB of bf16 never touch the
disk, which on nvidia-h200 is 64 GiB; the values are those of the written checkpoint);
--write-files writes and reads safetensors instead (the whole loading path, minutes).

Stages: (1) nano-vLLM's bench workload (benchmarks/bench_engine.py: 256 requests, 133,966
output tokens), output tokens / wall time; (2) the median decode step at batch 1, 64, 256
(context ~1024). Each against its floor over the measured copy bandwidth, where a step reads
the non-expert weights once, in every MoE layer only the experts its tokens touch (expected
E (1 - (1 - k/E)^tokens): policy.model.ModelConfig.experts_touched; random weights route
close to uniformly) and its sequences' KV. The workload's floor sums that over decode steps
with every live sequence in one batch. (3) per MoE layer at batch 1, 64, 256 (CUDA, tp 1):
device launches counted by torch.profiler and microseconds per layer under a CUDA graph, of
the layer as it ran before the routing kernels (torch route + torch alignment + the two
grouped GEMMs at default tiles + torch's slot sum) and as it runs now (fused_experts at the
tiles chosen at load); and the tiles chosen per token-count bucket
(engine.kernels.fused_moe.choose_moe_tiles; with --kernel-plan naming an existing file, the
tiles read from it, untimed). (4) routing (tp 1): distinct experts per MoE
layer that real decode steps of --decode-batches sequences route to (eager steps, forward
hooks on the routers), against the uniform expectation the floor and the twin use.
Prints tables, then one line of JSON.
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import copy_bandwidth, decode_breakdown, nano_workload  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint import model_config_dict, tiny_config, write_random_checkpoint  # noqa: E402
from engine.layers.moe import FusedMoE, route  # noqa: E402


def weight_split(model) -> tuple[int, int, int]:
    """(bytes of everything but the experts, bytes of one expert in one layer, MoE layers)
    on this rank."""
    moe = [m for m in model.modules() if isinstance(m, FusedMoE)]
    if not moe:
        raise SystemExit(f"{type(model).__name__} has no mixture-of-experts layer")
    expert_params = {id(p) for m in moe for p in (m.w13, m.w2)}
    other = sum(p.numel() * p.element_size() for p in model.parameters()
                if id(p) not in expert_params)
    one = (moe[0].w13[0].numel() + moe[0].w2[0].numel()) * moe[0].w13.element_size()
    return other, one, len(moe)


def step_floor_bytes(cfg, split, batch: int, kv_tokens: int, kv_per_token: int) -> float:
    other, one_expert, layers = split
    return other + layers * cfg.experts_touched(batch) * one_expert + kv_tokens * kv_per_token


def workload_floor_bytes(cfg, split, prompts, params, kv_per_token: int) -> float:
    """Decode step j holds every sequence with more than j tokens left (all in one batch):
    its touched experts, the non-expert weights, and each live sequence's KV."""
    total = 0.0
    for j in range(max(p.max_tokens for p in params)):
        live = [(len(x), p) for x, p in zip(prompts, params) if p.max_tokens > j]
        kv = sum(n + j for n, _ in live)
        total += step_floor_bytes(cfg, split, len(live), kv, kv_per_token)
    return total


def legacy_moe(layer: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    """The fused layer as it ran before the routing kernels (for the launch count)."""
    from engine.kernels import fused_moe as fm
    weights, ids = route(layer.gate(x), layer.top_k, layer.renormalize)
    tiles = fm.default_tiles(ids.numel(), layer.num_experts)
    pairs, blocks = fm.align_by_expert(ids, layer.num_experts, tiles.block_m)
    h = fm.gate_up(x, layer.w13, pairs, blocks, layer.top_k, tiles.block_m, tiles.gate_up)
    y = fm.down(h, layer.w2, weights.reshape(-1).float().contiguous(), pairs, blocks,
                tiles.block_m, tiles.down)
    return y.view(x.shape[0], layer.top_k, -1).float().sum(1).to(x.dtype)


def device_launches(fn) -> int:
    """Device activities (kernels, memsets, copies) of one eager fn() call."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@torch.inference_mode()
def layer_rows(model, batches: list[int]) -> list[dict]:
    """Stage 3: launches and graph-replay microseconds per MoE layer, before and now (over
    up to 4 layers per graph, so the experts come from HBM as in a step)."""
    from engine.kernels.skinny_gemm import graph_time_us
    layers = [m for m in model.modules() if isinstance(m, FusedMoE) and m.fused][:4]
    if not layers:
        return []
    rows = []
    for batch in batches:
        x = torch.randn(batch, layers[0].w13.shape[2], device=layers[0].w13.device,
                        dtype=layers[0].w13.dtype)
        row = {"batch": batch}
        for name, fn in (("before", legacy_moe), ("now", lambda m, x: m(x))):
            row[f"launches_{name}"] = device_launches(lambda: fn(layers[0], x))
            row[f"us_{name}"] = graph_time_us(lambda: [fn(m, x) for m in layers], 10) / len(layers)
        rows.append(row)
    return rows


def planned_tiles(model) -> list[dict]:
    """The tiles the first fused MoE layer runs per token bucket (as choose_moe_tiles
    reports them, without timings): what a kernel plan read at start set."""
    from engine.kernels.fused_moe import _tiles_str
    layer = next((m for m in model.modules() if isinstance(m, FusedMoE) and m.moe_tiles), None)
    return [dict(tokens=t, block_m=c.block_m, gate_up=_tiles_str(c.gate_up), down=_tiles_str(c.down))
            for t, c in (layer.moe_tiles if layer else ())]


def measured_routing(llm, batches: list[int], context: int, steps: int = 4) -> list[dict]:
    """Stage 4: distinct experts per MoE layer in real decode steps of each batch size (the
    engine's eager path, so forward hooks on the routers see every step; top-k of the router
    logits = top-k of their softmax), with the uniform expectation
    (policy.model.ModelConfig.experts_touched). Rank 0 only: tensor parallelism 1."""
    runner = llm.model_runner
    cfg = runner.model.config
    layers = [m for m in runner.model.modules() if isinstance(m, FusedMoE)]
    seen: list[tuple[int, int]] = []   # (tokens, distinct experts) per MoE layer call

    def count(module, args, logits):
        ids = torch.topk(logits.float(), layers[0].top_k, dim=-1).indices
        seen.append((logits.shape[0], ids.unique().numel()))
    handles = [m.gate.register_forward_hook(count) for m in layers]
    graphs = runner.packer.decode_sizes, runner.packer.mixed_sizes
    runner.packer.decode_sizes, runner.packer.mixed_sizes = [], []     # eager steps
    rows = []
    try:
        rng = random.Random(1)
        for batch in batches:
            prompts = [[rng.randrange(10000) for _ in range(context)] for _ in range(batch)]
            seen.clear()
            llm.generate(prompts, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=steps + 1),
                         use_tqdm=False)
            decode = [n for tokens, n in seen if tokens == batch]    # decode-only steps
            if not decode:
                continue
            per_step = [statistics.mean(decode[i:i + len(layers)])
                        for i in range(0, len(decode), len(layers))]
            rows.append({"batch": batch, "steps": len(per_step),
                         "measured": statistics.mean(decode), "min_layer": min(decode),
                         "max_layer": max(decode), "expected": cfg.experts_touched(batch)})
    finally:
        runner.packer.decode_sizes, runner.packer.mixed_sizes = graphs
        for h in handles:
            h.remove()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-30b-a3b",
                    help="model directory, or a conf/model name (a random checkpoint is written)")
    ap.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                    help="tensor parallelism: every expert's intermediate dim split over the GPUs")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--backend", default="auto", help="attention backend (triton on CUDA: "
                    "the fused MoE kernel too)")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--decode-batches", default="1,64,256")
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--num-layers", type=int, default=None,
                    help="keep only this many layers of a conf/model name (the random "
                         "checkpoint of all 48 Qwen3-30B-A3B layers is 61 GB; the floor is "
                         "computed for the model as built)")
    ap.add_argument("--write-files", action="store_true",
                    help="write the random checkpoint as safetensors and load it from disk "
                         "(default: drawn on the GPU at load time, no files)")
    ap.add_argument("--kernel-plan", help="EngineConfig.kernel_plan: a file pinning the start-up "
                    "kernel choice, the fused-MoE tiles included (written by the first run that "
                    "names it, read by the others: A/B runs on one kernel plan)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny Qwen3-MoE, 8 short requests, CPU if no GPU: proves the script runs")
    args = ap.parse_args()

    extra = {}
    if args.smoke:
        args.num_seqs, args.max_input_len, args.max_output_len = 8, 120, 110
        args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens = 256, 8, 512
        args.decode_batches, args.decode_context = "1,4", 32
        if args.model == "qwen3-30b-a3b":
            args.model = "tiny-qwen3_moe"
        if not torch.cuda.is_available():
            extra = dict(device="cpu", dtype="float32", num_gpu_blocks=256)
    path = args.model
    if not os.path.isdir(path):
        layers = f"-{args.num_layers}l" if args.num_layers else ""
        kind = "" if args.write_files else "-drawn"
        path = os.path.join(tempfile.gettempdir(), f"twinserve-{args.model}{layers}{kind}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            config = (tiny_config(args.model.removeprefix("tiny-"), vocab_size=10240)
                      if args.model.startswith("tiny-") else model_config_dict(args.model))
            if args.num_layers:
                config = {**config, "num_hidden_layers": args.num_layers}
            print(f"random checkpoint {args.model} -> {path}"
                  + ("" if args.write_files else " (drawn at load time)"), file=sys.stderr)
            write_random_checkpoint(config, path, dtype="float32" if extra else "bfloat16",
                                    files=args.write_files)

    plan_read = bool(args.kernel_plan) and os.path.exists(args.kernel_plan)
    started = time.perf_counter()
    llm = LLM(path, block_size=args.block_size, attention_backend=args.backend,
              tensor_parallel_size=args.tp, kernel_plan=args.kernel_plan, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, **extra)
    startup_s = time.perf_counter() - started
    cfg = llm.model_runner.model.config
    prompts, params = nano_workload(args.num_seqs, args.max_input_len, args.max_output_len)
    output_tokens = sum(p.max_tokens for p in params)

    # stage 1: the workload (after a warm-up that builds kernels and graphs)
    llm.generate(prompts[:32], SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=8),
                 use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    assert sum(len(o.token_ids) for o in outs) == output_tokens

    # stage 2: decode steps by batch size
    runner = llm.model_runner
    split = weight_split(runner.model)
    kv_per_token = sum(layer.k_cache[0, 0].numel() * 2 * layer.k_cache.element_size()
                       for layer in runner.model.attention_layers())
    cuda = torch.cuda.is_available() and not extra
    ceiling = copy_bandwidth() if cuda else float("nan")
    floor_s = workload_floor_bytes(cfg, split, prompts, params, kv_per_token) / ceiling
    decode = [decode_breakdown(llm, b, args.decode_context, 16)
              for b in map(int, args.decode_batches.split(",")) if b <= args.max_num_seqs]
    # stage 3: one MoE layer, before and now (tp 1: the layer's all-reduce needs every rank)
    layer_table = layer_rows(runner.model, [1, 64, 256]) if cuda and args.tp == 1 else []
    tiles = getattr(runner, "moe_report", []) or planned_tiles(runner.model)
    # stage 4: routing of real decode steps (tp 1: the hooks run on rank 0's process)
    routing = (measured_routing(llm, [b for b in map(int, args.decode_batches.split(","))
                                      if b <= args.max_num_seqs], min(args.decode_context, 256))
               if args.tp == 1 else [])
    llm.close()
    for d in decode:
        d["experts_touched"] = cfg.experts_touched(d["batch"])
        d["floor_bytes"] = step_floor_bytes(cfg, split, d["batch"],
                                            d["batch"] * args.decode_context, kv_per_token)
        if d["steps"]:
            d["floor_ms"] = d["floor_bytes"] / ceiling * 1e3
            d["pct_of_floor"] = 100 * d["floor_ms"] / d["device_ms"]

    device = torch.cuda.get_device_name() if cuda else "cpu"
    other, one_expert, layers = split
    print(f"\n{args.model} ({cfg.num_hidden_layers} layers) on {device}, tp {args.tp}, backend {args.backend}, "
          f"engine ready in {startup_s:.1f} s: "
          f"{cfg.num_experts} experts, top {cfg.num_experts_per_tok}, {layers} MoE layers; "
          f"per rank: non-expert weights {other / 1e9:.2f} GB, experts "
          f"{layers * cfg.num_experts * one_expert / 1e9:.2f} GB, KV {kv_per_token / 1024:.0f} "
          f"KiB/token; copy ceiling {ceiling / 1e9:.0f} GB/s")
    print(f"{'requests':>9} {'output tokens':>14} {'time (s)':>9} {'tok/s':>9} {'floor (s)':>10} "
          f"{'% of floor':>11}")
    print(f"{args.num_seqs:>9} {output_tokens:>14,} {seconds:>9.2f} {output_tokens / seconds:>9.1f} "
          f"{floor_s:>10.2f} {100 * floor_s / seconds:>10.1f}%")
    print(f"\ndecode step at context ~{args.decode_context} (median):")
    print(f"{'batch':>6} {'experts/layer':>14} {'floor GB':>9} {'step ms':>8} {'device ms':>10} "
          f"{'floor ms':>9} {'% of floor':>11}")
    for d in decode:
        if d["steps"]:
            print(f"{d['batch']:>6} {d['experts_touched']:>14.1f} {d['floor_bytes'] / 1e9:>9.3f} "
                  f"{d['step_ms']:>8.3f} {d['device_ms']:>10.3f} {d['floor_ms']:>9.3f} "
                  f"{d['pct_of_floor']:>10.1f}%")
    print("\nMoE layer (eager launches counted by torch.profiler; us: CUDA-graph replay, "
          "over up to 4 layers):")
    if layer_table:
        print(f"{'batch':>6} {'launches before':>16} {'now':>5} {'us before':>10} {'us now':>8}")
        for r in layer_table:
            print(f"{r['batch']:>6} {r['launches_before']:>16} {r['launches_now']:>5} "
                  f"{r['us_before']:>10.1f} {r['us_now']:>8.1f}")
    else:
        print("  n/a (needs CUDA and tp 1)")
    print("\nfused MoE tiles chosen at load (gate_up + down, us per layer; BNxBK warps stages)"
          + (f", read from {args.kernel_plan} (not timed):" if plan_read else ":"))
    if tiles and plan_read:
        print(f"{'tokens':>7} {'block_m':>8} {'gate_up':>16} {'down':>16}")
        for r in tiles:
            print(f"{r['tokens']:>7} {r['block_m']:>8} {r['gate_up']:>16} {r['down']:>16}")
    elif tiles:
        print(f"{'tokens':>7} {'block_m':>8} {'gate_up':>16} {'down':>16} {'default us':>11} "
              f"{'chosen us':>10}")
        for r in tiles:
            print(f"{r['tokens']:>7} {r['block_m']:>8} {r['gate_up']:>16} {r['down']:>16} "
                  f"{r['default_us']:>11.1f} {r['chosen_us']:>10.1f}")
    else:
        print("  none (CPU, fp32, or no fused MoE layer)")
    print("\nrouting of real decode steps (distinct experts per MoE layer; expected: uniform "
          "top-k, E (1 - (1 - k/E)^batch)):")
    if routing:
        print(f"{'batch':>6} {'steps':>6} {'measured':>9} {'min layer':>10} {'max layer':>10} {'expected':>9}")
        for r in routing:
            print(f"{r['batch']:>6} {r['steps']:>6} {r['measured']:>9.1f} {r['min_layer']:>10} "
                  f"{r['max_layer']:>10} {r['expected']:>9.1f}")
    else:
        print("  n/a (tp 1 only)")
    print(json.dumps({"bench": "moe", "workload": "nano-vllm", "model": args.model,
                      "num_layers": cfg.num_hidden_layers,
                      "device": device, "tp": args.tp, "backend": args.backend,
                      "weights": "files" if args.write_files else "drawn at load",
                      "startup_s": startup_s, "routing": routing,
                      "kernel_plan": args.kernel_plan, "kernel_plan_read": plan_read,
                      "output_tokens": output_tokens, "seconds": seconds,
                      "output_tok_per_s": output_tokens / seconds, "floor_s": floor_s,
                      "pct_of_floor": 100 * floor_s / seconds, "copy_GBps": ceiling / 1e9,
                      "decode": decode, "moe_layer": layer_table, "moe_tiles": tiles}))


if __name__ == "__main__":
    main()
