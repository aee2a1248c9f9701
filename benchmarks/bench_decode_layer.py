"""The one-launch decoder layer (engine.kernels.decode_layer) against the engine's five launches
a layer, on a decode-only step: every layer of a model (distinct weights, so they come from
HBM as in serving) captured in one CUDA graph, median of replays, per layer and against the
layer's floor (its weight and KV bytes over the measured copy bandwidth).

    python benchmarks/bench_decode_layer.py --model qwen3-0.6b [--rows 1,16] [--context 1024]

Variants: `five` (the engine's path: skinny GEMMs with fused norms / SwiGLU, the folded decode
kernel, PDL on, the skinny plan of `--kernel-plan` or the default splits), `one` (one launch a
layer, programs per SM x L2 prefetch distance, `--ppsm`, `--ahead`, and without prefetch),
`stages` (the one-launch kernel's five stages as five launches: the barrier's cost apart).
GPU only; `--smoke` runs the `one` (as stages) and `five` paths once on the interpreter.
Ends with one JSON line."""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.checkpoint import model_config_dict  # noqa: E402
from engine.kernels import decode_layer as dl  # noqa: E402
from engine.kernels.launch import decode_work_capacity, plan_decode_work  # noqa: E402
from engine.layers.attention import AttentionMetadata  # noqa: E402
from engine.models import build_model  # noqa: E402
from policy.model import ModelConfig  # noqa: E402


def step(cfg: ModelConfig, rows: int, context: int, block_size: int, sms: int, device):
    """A decode-only step of `rows` sequences at `context` tokens, blocks shuffled over a pool."""
    need = -(-context // block_size)
    gen = torch.Generator().manual_seed(rows)
    perm = torch.randperm(rows * need + 1, generator=gen)[:rows * need].view(rows, need).int()
    slots = perm[:, (context - 1) // block_size].long() * block_size + (context - 1) % block_size
    items = np.zeros((decode_work_capacity(rows, cfg.num_key_value_heads, sms), 4), np.int32)
    index = np.zeros((rows, 2), np.int32)
    plan_decode_work(np.full(rows, context), cfg.num_key_value_heads, sms, items, index)
    to = lambda t: t.to(device)   # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=to(slots), block_tables=to(perm), context_lens=to(torch.full((rows,), context, dtype=torch.int32)),
        query_start_loc=to(torch.arange(rows + 1, dtype=torch.int32)), max_query_len=1, max_context_len=context,
        num_decode_tokens=rows, decode_rows=rows,
        decode_work=(to(torch.from_numpy(items)), to(torch.from_numpy(index))))
    return meta, rows * need + 1


def time_graph(fn, replays: int) -> float:
    """Median us of one replay of a graph of `fn` (after warm-up), replays timed one by one."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    x = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    us = time_graph(lambda: y.copy_(x), 10)
    return 2 * x.numel() / us * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=0, help="0: the model's")
    ap.add_argument("--ppsm", default="1,2,4")
    ap.add_argument("--ahead", default="0,1,3")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--kernel-plan", help="a plan or calibration file pinning the five-launch path's skinny GEMMs")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    hf = model_config_dict(args.model)
    if args.layers:
        hf["num_hidden_layers"] = args.layers
    if args.smoke:
        hf.update(hidden_size=96, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, num_hidden_layers=2)
    cfg = ModelConfig.from_hf(hf)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build_model(cfg, dtype, device, attention_backend="triton", max_model_len=args.context + 16)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        p.data.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.02, generator=gen)
    layers = list(model.model.layers)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    pdl = None
    if device.type == "cuda":
        from engine.kernels import pdl as pdl_module
        pdl = pdl_module if pdl_module.supported(device) else None
        pinned = False
        if args.kernel_plan:   # the engine's choice of skinny GEMMs, as a calibration recorded it
            from engine import kernel_plan
            try:
                kernel_plan.apply(model, kernel_plan.read(args.kernel_plan), torch.cuda.get_device_name(device),
                                  args.kernel_plan, parts=("skinny",), pdl_rows=32)
                pinned = True
            except ValueError as e:
                print(f"kernel plan not applied ({e}): timing the choice instead")
        if not pinned:         # as the engine does at start
            from engine.kernels.skinny_gemm import choose_skinny_gemm
            if pdl is not None:
                pdl.enable(True)
            choose_skinny_gemm(model, pdl_rows=32)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else float("nan")
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        meta, blocks = step(cfg, rows, args.context, 16, sms, device)
        for layer in layers:   # its own KV pages, random
            shape = (blocks, 16, cfg.num_key_value_heads, cfg.head_dim)
            layer.self_attn.attn.k_cache = torch.randn(shape, dtype=dtype, device=device)
            layer.self_attn.attn.v_cache = torch.randn(shape, dtype=dtype, device=device)
        dl.reserve(device, layers[0].launch_weights(), cfg.head_dim, rows)
        hidden = torch.randn(rows, cfg.hidden_size, dtype=dtype, device=device)
        positions = torch.full((rows,), args.context - 1, dtype=torch.int64, device=device)
        weight_bytes = sum(p.numel() * p.element_size() for lay in layers for p in lay.parameters())
        kv_bytes = len(layers) * rows * args.context * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
        floor_us = (weight_bytes + kv_bytes) / bandwidth * 1e6 / len(layers)

        def forward(one_launch, **kw):
            def run():
                h, r = hidden, None
                for layer in layers:
                    if one_launch:
                        h, r = dl.decode_layer(layer.launch_weights(), h, r, positions, layer.self_attn.rotary_emb.cos,
                                               layer.self_attn.rotary_emb.sin, layer.self_attn.attn.k_cache,
                                               layer.self_attn.attn.v_cache, meta.block_tables, meta.context_lens,
                                               meta.query_start_loc, meta.slot_mapping, meta.decode_work, **kw)
                    else:
                        h, r = layer(positions, h, r, meta)
                return h
            return run

        variants = [("five", {}, forward(False))]
        for ppsm in [int(x) for x in args.ppsm.split(",")]:
            for ahead in [int(x) for x in args.ahead.split(",")]:
                variants.append((f"one ppsm{ppsm} ahead{ahead}", dict(ppsm=ppsm, ahead=ahead),
                                 forward(True, programs_per_sm=ppsm, ahead=ahead)))
            variants.append((f"one ppsm{ppsm} noprefetch", dict(ppsm=ppsm, prefetch=False),
                             forward(True, programs_per_sm=ppsm, prefetch=False)))
            variants.append((f"stages ppsm{ppsm}", dict(ppsm=ppsm, stages=True),
                             forward(True, programs_per_sm=ppsm, stages=True)))
        if args.smoke:
            variants = [("five", {}, forward(False)), ("stages", {}, forward(True))]
        for name, knobs, fn in variants:
            if pdl is not None:
                pdl.enable(name == "five")
            with torch.inference_mode():
                if device.type == "cuda":
                    us = time_graph(fn, args.replays) / len(layers)
                else:
                    fn()
                    us = float("nan")
            results.append(dict(rows=rows, variant=name, **knobs, us_per_layer=round(us, 2),
                                floor_us=round(floor_us, 2), vs_floor=round(us / floor_us, 2)))
            print(f"rows {rows:>3} {name:<24} {us:8.2f} us/layer  floor {floor_us:6.2f}  x{us / floor_us:5.2f}", flush=True)
    print(json.dumps({"bench": "decode_layer", "model": args.model, "context": args.context,
                      "copy_GBps": round(bandwidth / 1e9, 1), "rows": results}))


if __name__ == "__main__":
    main()
