"""Speed of the engine's paged-attention kernels against the copy ceiling, flashinfer and SDPA,
and by KV block size (what the simulator's cost model is told).

    python benchmarks/bench_attention.py                 # CUDA: every stage
    python benchmarks/bench_attention.py --no-flashinfer # skip flashinfer (its first call JIT-compiles)
    python benchmarks/bench_attention.py --stages prefill --no-flashinfer   # prefill launches vs the old kernel
    python benchmarks/bench_attention.py --sweep         # also time other decode launch configs (tuning)
    python benchmarks/bench_attention.py --smoke         # CPU: tiny shapes under TRITON_INTERPRET=1
    python benchmarks/bench_attention.py --stages blocks --write-hardware conf/hardware/h200.yaml
                                                         # block-size costs into a hardware file
    python benchmarks/bench_attention.py --stages fold --no-flashinfer   # split merge: in-kernel vs 2 kernels
    python benchmarks/bench_attention.py --stages overlap --no-flashinfer  # a mixed step's two kernels on two streams

Stages (`--stages`, default all but fold and overlap): `decode` and `prefill` (the kernel
tables below), `blocks`, `fold` and `overlap`.

Overlap (`--stages overlap`, ~20 s on an H200): a mixed step's attention runs two kernels one
after the other, the decodes' split-KV kernel (memory-bound) and the prompt chunk's prefill
kernel (compute-bound), on disjoint rows: could they share the GPU? Per case (B decodes of
contexts 768..1280 beside one fresh prompt of P tokens, its tile list padded as a mixed graph
of B + P tokens pads it), us per layer in a CUDA graph of `layers` layers (each its own KV):
`decode` and `prefill` alone, `serial` (both, the engine's order), `streams` (the decode
kernel on a second stream forked and joined inside the graph, at every layer), `prefill_1` /
`streams_1` the same with one prefill program per SM at a time (two fill an SM's registers,
leaving a decode program no room), `ideal` = max(decode, prefill), and `saved` = serial - the
better streams. `max_diff`: the streams' outputs against serial's (the same kernels: 0).

Fold (`--stages fold`, ~30 s on an H200): a decode layer's attention as a decode-only step
runs it, q/k RMSNorm + RoPE + the K/V store of its qkv row, then split-KV attention, in four
variants (TWINSERVE_DECODE_FOLD's settings): `two` (qk_norm_rope_store, the decode kernel, the
merge kernel: none), `fold` (the merge in the decode kernel: merge), `qkv` (RoPE + store in the
decode kernel, the merge kernel after it: qkv), `fold_qkv` (everything in the decode kernel:
merge,qkv, the default). Through the model runner's launch (balanced work list from plan_decode_work,
query_start_loc, PDL on at B <= 32 as EngineConfig.pdl_max_tokens has it) at B = 1, 16, 64,
256, contexts drawn from 768..1280 (mean ~1k), pages of 16, Qwen3-style q/k norms.
`<variant>_us`: one CUDA-graph replay of `layers` layers, each over its own KV cache (as a
step's layers are; up to 28, at most ~8 GB of KV), divided by `layers`: per layer of a step,
launch overhead gone, PDL overlap kept. `eager_<variant>`: one layer, do_bench (L2 flushed).
`items` / `split`: work items and sequences split (merged). `rel_err`: `two` against the torch
decode attention over the cache it filled; `max_diff`: the largest difference of the others
from `two`. Registers / spilled bytes of each variant's decode kernel (compiled for this GPU).

Decode: B in {1, 64, 256} x context {512, 1024, 4096} x block size {16, 32, 64, 256}, Qwen3-0.6B
heads (16 query / 8 KV, head_dim 128), bf16, blocks scattered at random over the pool. Time is
triton.testing.do_bench's median (warm-up, L2 flushed before each run); `graph_us` replays the
call in a CUDA graph (no launch overhead, but no L2 flush either: small cases then read from L2).
KV bandwidth = K+V bytes of all contexts / time; `%copy` compares it with a device-to-device
copy of a 4 GiB tensor measured here ((read + write) bytes / time). `rel_err` is
||ours - sdpa|| / ||sdpa||.

Prefill (`--stages prefill`, ~1-2 min on an H200): one sequence of 512, 2048 and 8192 fresh
tokens, 2048 new tokens behind a 2048-token cached prefix, and through a tile list padded as
a mixed CUDA graph's (the engine's path) a 2048-token prompt (graph of 2112 tokens: 64
decodes + 2048) and a 16-token one (graph of 128), same heads and pages of 16. Per case: the old
kernel (benchmarks/prefill_baseline.py, engine 93476b2), the engine's kernel at every launch
of PREFILL_CANDIDATES (the engine's own, engine.kernels.launch.PREFILL_LAUNCH, is marked),
flashinfer when installed, and PyTorch SDPA on dense K/V for the fresh prompts (FlashAttention-2
where torch has it: a reference); us per call (= per layer), causal TFLOP/s, % of the bf16
matmul peak measured here (torch.mm 8192^3), speedup over the old kernel, rel_err vs SDPA.

Blocks: the same work at every KV block size of `--block-sizes` (default 1..256), through the
engine's public calls only: `paged_decode_attention` (with the model runner's split-KV work
list from `plan_decode_work` and its query_start_loc) at (batch, context) = (32, 2048),
(64, 4096), (256, 1024), and `paged_prefill_attention` on 4 fresh 1024-token prompts, 4
512-token chunks behind 1536 cached tokens and 16 64-token chunks behind 2048 (prefill
chunks: also the prefill half of a mixed step). Each row prints time / time at block 16; the
`all` row is the time-weighted ratio (sum of the row times / their sum at block 16), which is
what the cost model's `attention_block_cost` holds per kernel (simulator/hardware.py): the
roofline multiplies its decode and prefill attention terms by it, the fitted model its
attention coefficients (by cost(run's block) / cost(profiled block)). `--write-hardware`
replaces a hardware YAML's `attention_block_cost` with the measured one (comments kept).

Ends with one line of JSON (`block_cost`: {"decode": {block: cost}, "prefill": {...}}).
"""
import argparse
import dataclasses
import importlib
import itertools
import json
import os
import pathlib
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter")
ARGS.add_argument("--no-flashinfer", action="store_true")
ARGS.add_argument("--sweep", action="store_true",
                  help="time the kernels' launch constants (tile, warps, stages) on a few shapes")
ARGS.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
ARGS.add_argument("--stages", default="decode,prefill,blocks",
                  help="comma list of decode, prefill, blocks, fold, overlap (default: the first three)")
ARGS.add_argument("--block-sizes", default="1,2,4,8,16,32,64,128,256",
                  help="KV block sizes of the blocks stage (16, the reference, is always included)")
ARGS.add_argument("--write-hardware", action="append", default=[], metavar="YAML",
                  help="write the blocks stage's costs into this hardware YAML's attention_block_cost "
                       "(repeat for several files)")
args = ARGS.parse_args()
STAGES = [x.strip() for x in args.stages.split(",") if x.strip()]
if not STAGES or set(STAGES) - {"decode", "prefill", "blocks", "fold", "overlap"}:
    ARGS.error(f"--stages must list some of decode, prefill, blocks, fold, overlap; got {args.stages!r}")
try:
    BLOCK_SIZES = sorted({int(x) for x in args.block_sizes.split(",") if x.strip()} | {16})
except ValueError:
    ARGS.error(f"--block-sizes must be a comma list of integers, got {args.block_sizes!r}")
if BLOCK_SIZES[0] < 1:
    ARGS.error(f"--block-sizes must be >= 1, got {args.block_sizes!r}")
if args.write_hardware and "blocks" not in STAGES:
    ARGS.error("--write-hardware writes the blocks stage's costs: add blocks to --stages")
if args.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from engine.kernels import (choose_num_splits, paged_attention, paged_decode_attention,  # noqa: E402
                            paged_prefill_attention, pdl)
from engine.kernels.fused import qk_norm_rope_store  # noqa: E402
from engine.kernels.launch import (PREFILL_LAUNCH, PrefillLaunch, decode_work_capacity,  # noqa: E402
                                   plan_decode_work, prefill_tile_tokens)
from policy.decode_plan import DecodePlan  # noqa: E402
from engine.kernels.paged_attention import paged_decode_attention_qkv  # noqa: E402
from engine.layers.attention import torch_decode_attention  # noqa: E402
from engine.layers.rotary import RotaryEmbedding  # noqa: E402
from simulator.hardware import HardwareSpec  # noqa: E402

for _path in args.write_hardware:   # refuse a file that cannot take the costs before measuring
    try:
        HardwareSpec(**yaml.safe_load(open(_path)))
    except (OSError, TypeError, ValueError, yaml.YAMLError) as _e:
        ARGS.error(f"--write-hardware {_path}: not a hardware file ({type(_e).__name__}: {_e})")

DEVICE = "cpu" if args.smoke else "cuda"
DTYPE = torch.float32 if args.smoke else getattr(torch, args.dtype)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = (4, 2, 64) if args.smoke else (16, 8, 128)
SCALE = HEAD_DIM ** -0.5


def measure(fn, warmup_ms=25, rep_ms=100) -> float:
    """Median milliseconds of fn()."""
    if DEVICE == "cpu":
        fn()  # compile/warm
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def measure_graph(fn):
    if DEVICE == "cpu":
        return None
    # do_bench_cudagraph runs fn on a fresh stream that does not wait for this one: without the
    # sync its first calls overlap what was just queued here (overlap_row's eager run), and two
    # folded decode launches at once share the ticket counters (paged_decode_attention's contract)
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def copy_ceiling_gbps(nbytes=4 << 30) -> float:
    src = torch.ones(nbytes // 2, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def paged_batch(k, v, block_size, gen):
    """Scatter dense per-sequence K/V ([B, ctx, Hkv, D]) into a paged cache over randomly
    permuted blocks (the rows store_kvcache would write, by torch indexing: no kernel to
    compile per block size)."""
    batch, ctx = k.shape[0], k.shape[1]
    blocks_per_seq = triton.cdiv(ctx, block_size)
    num_blocks = batch * blocks_per_seq
    # zeros, not empty: the last block's rows past ctx are read (masked) by torch references,
    # where 0 x a NaN of uninitialized memory would still be NaN
    k_cache = torch.zeros(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE)
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    pos = torch.arange(ctx, device=DEVICE)
    slots = (block_tables[:, pos // block_size].long() * block_size + pos % block_size).flatten()
    k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = k.flatten(0, 1)
    v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = v.flatten(0, 1)
    return k_cache, v_cache, block_tables


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def flashinfer_module():
    if args.no_flashinfer or args.smoke:
        return None, "skipped"
    try:
        import flashinfer
        return flashinfer, getattr(flashinfer, "__version__", "?")
    except Exception as e:  # optional dependency
        return None, f"unavailable: {type(e).__name__}: {e}"


def flashinfer_decode(fi, q, k_cache, v_cache, block_tables, ctx, use_tensor_cores):
    batch, blocks_per_seq = block_tables.shape
    block_size = k_cache.shape[1]
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=DEVICE)
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=use_tensor_cores)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * blocks_per_seq
    last = torch.full((batch,), ctx - (blocks_per_seq - 1) * block_size, dtype=torch.int32, device=DEVICE)
    wrapper.plan(indptr, block_tables.flatten(), last, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, block_size,
                 q_data_type=DTYPE, kv_data_type=DTYPE, sm_scale=SCALE)
    return lambda: wrapper.run(q, (k_cache, v_cache))


def flashinfer_prefill(fi, q, k_cache, v_cache, block_tables, qsl, ctx):
    batch, blocks_per_seq = block_tables.shape
    block_size = k_cache.shape[1]
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)
    wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * blocks_per_seq
    last = torch.full((batch,), ctx - (blocks_per_seq - 1) * block_size, dtype=torch.int32, device=DEVICE)
    wrapper.plan(qsl, indptr, block_tables.flatten(), last, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, block_size,
                 causal=True, sm_scale=SCALE, q_data_type=DTYPE, kv_data_type=DTYPE)
    return lambda: wrapper.run(q, (k_cache, v_cache))


def try_time(make_fn, ref=None):
    """(ms, rel_err or None, error string or None) for an optional baseline."""
    try:
        fn = make_fn()
        out = fn()
        return measure(fn), (rel_err(out, ref) if ref is not None else None), None
    except Exception as e:
        return None, None, f"{type(e).__name__}: {str(e)[:200]}"


def bench_decode(fi, copy_gbps, gen):
    batches, contexts, block_sizes = ([2], [300], [1, 16]) if args.smoke else (
        [1, 64, 256], [512, 1024, 4096], [16, 32, 64, 256])
    rows = []
    for batch in batches:
        for ctx in contexts:
            q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
            k = torch.randn(batch, ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
            v = torch.randn(batch, ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
            k_dense, v_dense = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, ctx, D]

            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(
                    q.unsqueeze(2), k_dense, v_dense, scale=SCALE, enable_gqa=True).squeeze(2)
            ref = sdpa()
            sdpa_ms = measure(sdpa)
            kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * k.element_size()
            context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
            for block_size in block_sizes:
                k_cache, v_cache, block_tables = paged_batch(k, v, block_size, gen)
                num_splits = choose_num_splits(batch, NUM_KV_HEADS, ctx, _num_sms())
                out = torch.empty_like(q)

                def ours():
                    return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, SCALE,
                                                  num_splits, out=out)
                err = rel_err(ours(), ref)
                ms = measure(ours)
                graph_ms = measure_graph(ours)
                fi_ms, fi_err, fi_note = None, None, "skipped"
                for tensor_cores in ([] if fi is None else [False, True]):  # keep flashinfer's faster variant
                    t = try_time(lambda: flashinfer_decode(fi, q, k_cache, v_cache, block_tables, ctx, tensor_cores), ref)
                    if t[0] is not None and (fi_ms is None or t[0] < fi_ms):
                        fi_ms, fi_err, fi_note = t[0], t[1], f"use_tensor_cores={tensor_cores}"
                    elif fi_ms is None:
                        fi_note = t[2]
                gbps = kv_bytes / (ms * 1e-3) / 1e9
                rows.append({"B": batch, "ctx": ctx, "block": block_size, "splits": num_splits,
                             "us": ms * 1e3, "graph_us": graph_ms and graph_ms * 1e3, "GBps": gbps,
                             "pct_copy": 100 * gbps / copy_gbps if copy_gbps else None, "rel_err": err,
                             "flashinfer_us": fi_ms and fi_ms * 1e3, "flashinfer_err": fi_err,
                             "flashinfer_note": fi_note, "sdpa_dense_us": sdpa_ms * 1e3})
                del k_cache, v_cache, block_tables
            del k, v, k_dense, v_dense
    return rows


# ---- prefill: the engine's kernel, its launch candidates and the old kernel ---------------
# Candidate launches the prefill stage times (the engine's PREFILL_LAUNCH is always one of them).
PREFILL_CANDIDATES = [PrefillLaunch(64, 64, 4, 3), PrefillLaunch(64, 64, 4, 2), PrefillLaunch(64, 32, 4, 3),
                      PrefillLaunch(128, 32, 8, 3), PrefillLaunch(128, 32, 8, 2), PrefillLaunch(128, 64, 8, 3),
                      PrefillLaunch(128, 64, 8, 2), PrefillLaunch(128, 128, 8, 2)]


def launch_name(launch) -> str:
    return f"M{launch.block_m} N{launch.block_n} w{launch.num_warps} s{launch.num_stages}"


def matmul_peak_tflops() -> float | None:
    """bf16 (or --dtype) matmul rate of torch.mm at 8192^3, the compute ceiling of the table."""
    if DEVICE == "cpu":
        return None
    a = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    ms = measure(lambda: torch.mm(a, b))
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def prefill_cases():
    """(label, q_len, context_len, tiles) of one sequence: fresh prompts, a chunk behind a
    cached prefix (tiles None: the grid over query tiles), and the engine's CUDA-graph path,
    a tile list (tiles = the graph's token count: the list is padded with b = -1 to what
    engine.step_inputs sizes for a mixed graph of that many tokens, as the runner replays it)."""
    if args.smoke:
        return [("40 fresh", 40, 40, None), ("24 behind 24 cached", 24, 48, None), ("40 fresh, tiles", 40, 40, 40)]
    return [("512 fresh", 512, 512, None), ("2048 fresh", 2048, 2048, None), ("8192 fresh", 8192, 8192, None),
            ("2048 behind 2048 cached", 2048, 4096, None), ("2048 fresh, graph 2112", 2048, 2048, 2112),
            ("16 fresh, graph 128", 16, 16, 128)]


def tile_list(q_len, block_q, graph_tokens, heavy_first=True):
    """The tile list engine.step_inputs builds for one prefill sequence in a mixed graph of
    `graph_tokens` tokens: its tiles heaviest first (the old kernel's: lightest first), then
    padding up to the graph's tile capacity (tokens / block_q + rows, rows = min(tokens, 256):
    EngineConfig.max_num_seqs' default)."""
    tiles = [(0, t) for t in range(triton.cdiv(q_len, block_q))]
    if heavy_first:
        tiles.reverse()
    tiles += [(-1, 0)] * (triton.cdiv(graph_tokens, block_q) + min(graph_tokens, 256) - len(tiles))
    return torch.tensor(tiles, dtype=torch.int32, device=DEVICE)


def bench_prefill(fi, gen, peak):
    """Rows {case, kernel, us, TFLOPs, pct_peak, speedup (old us / us), rel_err} per case and
    kernel: the old kernel (benchmarks/prefill_baseline.py), every PREFILL_CANDIDATES launch
    of the engine's kernel, flashinfer when available, and for fresh prompts PyTorch's SDPA on
    dense K/V (its FlashAttention-2 backend: a reference, not paged). Block size 16, scattered
    pages."""
    from benchmarks.prefill_baseline import baseline_prefill_attention, prefill_tile_tokens as baseline_tile
    candidates = PREFILL_CANDIDATES[:2] if args.smoke else PREFILL_CANDIDATES
    if PREFILL_LAUNCH not in candidates:
        candidates = [PREFILL_LAUNCH] + candidates
    rows = []
    for label, q_len, ctx, graph_tokens in prefill_cases():
        q = torch.randn(q_len, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        k = torch.randn(1, ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        v = torch.randn_like(k)
        mask = None if q_len == ctx else torch.ones(q_len, ctx, dtype=torch.bool, device=DEVICE).tril(ctx - q_len)
        ref = torch.nn.functional.scaled_dot_product_attention(   # bottom-right causal
            q.unsqueeze(0).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=SCALE, enable_gqa=True,
            attn_mask=mask, is_causal=mask is None).transpose(1, 2)[0]
        k_cache, v_cache, block_tables = paged_batch(k, v, 16, gen)
        dense = [t.transpose(1, 2).contiguous() for t in (q.unsqueeze(0), k, v)]   # [1, heads, tokens, D]
        del k, v
        qsl = torch.tensor([0, q_len], dtype=torch.int32, device=DEVICE)
        context_lens = torch.tensor([ctx], dtype=torch.int32, device=DEVICE)
        flops = 4 * NUM_HEADS * HEAD_DIM * sum(ctx - q_len + i + 1 for i in range(q_len))
        out = torch.empty_like(q)
        calls = []

        def old():
            tiles = None
            if graph_tokens:   # the old kernel's list: light tiles first, as step_inputs built it
                tiles = tile_list(q_len, baseline_tile(NUM_HEADS, NUM_KV_HEADS, DTYPE), graph_tokens, False)
            return lambda: baseline_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, q_len,
                                                      SCALE, out=out, tiles=tiles)
        calls.append(("old kernel (93476b2)", old))
        for launch in candidates:
            def ours(launch=launch):
                tiles = None
                if graph_tokens:
                    tiles = tile_list(q_len, prefill_tile_tokens(NUM_HEADS, NUM_KV_HEADS, DTYPE, launch=launch),
                                      graph_tokens)
                return lambda: paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, q_len,
                                                       SCALE, out=out, tiles=tiles, launch=launch)
            default = " (engine)" if launch == PREFILL_LAUNCH else ""
            calls.append((launch_name(launch) + default, ours))
        if mask is None and not graph_tokens and DEVICE == "cuda":   # PyTorch's FlashAttention-2, dense K/V
            calls.append(("sdpa dense (flash)", lambda: lambda: torch.nn.functional.scaled_dot_product_attention(
                *dense, scale=SCALE, is_causal=True, enable_gqa=True).transpose(1, 2)[0]))
        if fi is not None and not graph_tokens:
            calls.append(("flashinfer", lambda: flashinfer_prefill(fi, q.contiguous(), k_cache, v_cache, block_tables,
                                                                   qsl, ctx)))
        base_ms = None
        for name, make in calls:
            ms, err, note = try_time(make, ref)
            if ms is None:
                print(f"  {label}: {name}: {note}", flush=True)
                continue
            base_ms = ms if name.startswith("old") else base_ms
            tflops = flops / (ms * 1e-3) / 1e12
            rows.append({"case": label, "kernel": name, "us": ms * 1e3, "TFLOPs": tflops,
                         "pct_peak": 100 * tflops / peak if peak else None, "speedup": base_ms and base_ms / ms,
                         "rel_err": err})
        del q, k_cache, v_cache, block_tables, ref, out, dense
    return rows


def print_prefill(prefill, peak):
    print(f"\nprefill attention, one sequence, block 16 (time per layer; matmul peak {fmt(peak, '.0f')} "
          f"TFLOP/s; speedup = old kernel's time / this one's)")
    print(f"{'case':>26} {'kernel':>24} {'us':>9} {'TFLOP/s':>8} {'%peak':>6} {'speedup':>7} {'rel_err':>8}")
    for r in prefill:
        print(f"{r['case']:>26} {r['kernel']:>24} {r['us']:>9.1f} {r['TFLOPs']:>8.1f} {fmt(r['pct_peak'], '6.1f')} "
              f"{fmt(r['speedup'], '7.2f')} {fmt(r['rel_err'], '8.1e')}")
    best = {}
    for r in prefill:
        if r["kernel"].startswith("M") and (r["case"] not in best or r["us"] < best[r["case"]]["us"]):
            best[r["case"]] = r
    for case, r in best.items():
        print(f"  fastest launch for {case}: {r['kernel']} ({fmt(r['speedup'], '.2f')}x the old kernel)")
    return prefill


# ---- blocks: the same work at every KV block size ------------------------------------------
REFERENCE_BLOCK = 16
STARTED = time.perf_counter()


def block_points():
    """(decode points [(batch, context)], prefill points [(label, num_seqs, q_len, context)])."""
    if args.smoke:
        return [(2, 40)], [("2x16 fresh", 2, 16, 16), ("1x8 behind 32 cached", 1, 8, 40)]
    return ([(32, 2048), (64, 4096), (256, 1024)],
            [("4x1024 fresh", 4, 1024, 1024), ("4x512 behind 1536 cached", 4, 512, 2048),
             ("16x64 behind 2048 cached", 16, 64, 2112)])


def decode_work(contexts):
    """The model runner's split-KV plan for decodes of these contexts (items, index), as
    engine.step_inputs builds it with engine.kernels.launch.plan_decode_work."""
    items = np.empty((decode_work_capacity(len(contexts), DecodePlan(NUM_KV_HEADS, _num_sms())), 4), np.int32)
    index = np.empty((len(contexts), 2), np.int32)
    plan_decode_work(np.array(contexts), DecodePlan(NUM_KV_HEADS, _num_sms()), items, index)
    return torch.from_numpy(items).to(DEVICE), torch.from_numpy(index).to(DEVICE)


def time_by_block(make_call, ref, k, v, gen) -> dict:
    """{block size: (ms, rel_err)} of the call `make_call(k_cache, v_cache, block_tables)`
    returns, over the same K/V scattered into a fresh paged cache of each block size."""
    out = {}
    for block_size in BLOCK_SIZES:
        k_cache, v_cache, block_tables = paged_batch(k, v, block_size, gen)
        call = make_call(k_cache, v_cache, block_tables)
        err = rel_err(call(), ref)
        out[block_size] = (measure(call, warmup_ms=10, rep_ms=50), err)   # 54 timings in one short call
        del k_cache, v_cache, block_tables, call
    return out


def bench_blocks(gen):
    """Rows {"kernel", "point", "ms": {block: ms}, "rel_err": worst} per point; see the
    module docstring."""
    decode_points, prefill_points = block_points()
    rows = []
    for batch, ctx in decode_points:
        q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        k = torch.randn(batch, ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        v = torch.randn_like(k)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), scale=SCALE, enable_gqa=True).squeeze(2)
        context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)   # as the model runner passes it
        work = decode_work([ctx] * batch)
        out = torch.empty_like(q)

        def make_call(k_cache, v_cache, block_tables):
            return lambda: paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, SCALE,
                                                  out=out, query_start_loc=qsl, work=work)
        rows.append(point_row("decode", f"B={batch} ctx={ctx}", time_by_block(make_call, ref, k, v, gen)))
        del q, k, v, ref, out
    for label, batch, q_len, ctx in prefill_points:
        q = torch.randn(batch * q_len, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        k = torch.randn(batch, ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        v = torch.randn_like(k)
        mask = torch.ones(q_len, ctx, dtype=torch.bool, device=DEVICE).tril(ctx - q_len)  # bottom-right causal
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.view(batch, q_len, NUM_HEADS, HEAD_DIM).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, scale=SCALE, enable_gqa=True).transpose(1, 2).flatten(0, 1)
        context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * q_len
        out = torch.empty_like(q)

        def make_call(k_cache, v_cache, block_tables):
            return lambda: paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, qsl,
                                                   q_len, SCALE, out=out)
        rows.append(point_row("prefill", label, time_by_block(make_call, ref, k, v, gen)))
        del q, k, v, ref, out
    return rows


def point_row(kernel, point, times) -> dict:
    """The row of one point, printed at once (a run cut short still shows what it measured)."""
    row = {"kernel": kernel, "point": point, "ms": {b: t[0] for b, t in times.items()},
           "rel_err": max(t[1] for t in times.values())}
    print(f"  measured {kernel} {point} at {time.perf_counter() - STARTED:.1f} s: "
          + " ".join(f"{b}:{1e3 * ms:.1f}us" for b, ms in row["ms"].items()), flush=True)
    return row


def block_cost(rows) -> dict:
    """{kernel: {block: sum of its points' times / their sum at block 16}} (3 decimals)."""
    cost = {}
    for kernel in ("decode", "prefill"):
        ms = [r["ms"] for r in rows if r["kernel"] == kernel]
        ref = sum(m[REFERENCE_BLOCK] for m in ms)
        cost[kernel] = {b: round(sum(m[b] for m in ms) / ref, 3) for b in BLOCK_SIZES}
    return cost


def print_blocks(rows, cost) -> None:
    sizes = "".join(f"{b:>7}" for b in BLOCK_SIZES)
    for kernel in ("decode", "prefill"):
        print(f"\n{kernel} attention time by KV block size / time at block {REFERENCE_BLOCK}")
        print(f"{'point':>26}{sizes} {'us@16':>9} {'rel_err':>8}")
        for r in (r for r in rows if r["kernel"] == kernel):
            ratios = "".join(f"{r['ms'][b] / r['ms'][REFERENCE_BLOCK]:>7.3f}" for b in BLOCK_SIZES)
            print(f"{r['point']:>26}{ratios} {1e3 * r['ms'][REFERENCE_BLOCK]:>9.1f} {r['rel_err']:>8.1e}")
        print(f"{'all (time-weighted)':>26}" + "".join(f"{cost[kernel][b]:>7.3f}" for b in BLOCK_SIZES))


def write_block_cost(path, cost: dict, note: str) -> None:
    """Replace `attention_block_cost` in the hardware YAML at `path` (the key, its indented
    body and the comment lines right above it) with `cost`, keeping every other line; the
    result must load as a HardwareSpec holding exactly `cost`."""
    lines = pathlib.Path(path).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("attention_block_cost:")), None)
    if start is not None:
        end = start + 1
        while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
            end += 1
        while start > 0 and lines[start - 1].startswith("#"):
            start -= 1
        lines[start:end] = []
    block = [f"# {line}" for line in note.splitlines()] + ["attention_block_cost:"] + [
        f"  {kernel}: {{" + ", ".join(f"{b}: {c}" for b, c in table.items()) + "}"
        for kernel, table in cost.items()]
    text = "\n".join(lines + block) + "\n"
    written = HardwareSpec(**yaml.safe_load(text))
    assert written.attention_block_cost == cost, (written.attention_block_cost, cost)
    pathlib.Path(path).write_text(text)


# ---- fold: the split-KV merge in the decode kernel vs its own kernel --------------------------
FOLD_BATCHES = [1, 16, 64, 256]
PDL_MAX_TOKENS = 32          # EngineConfig.pdl_max_tokens' default: steps up to 32 tokens use PDL


# variant: (merge folded, RoPE + store folded); kernels per layer 3, 2, 2, 1 (one less without splits)
FOLD_VARIANTS = {"two": (False, False), "fold": (True, False), "qkv": (False, True), "fold_qkv": (True, True)}


def fold_layer_us(batch, contexts, gen) -> dict:
    """One row of the fold table: per variant (FOLD_VARIANTS) us per layer in a CUDA graph,
    eager us, and the largest difference from `two`'s output; `two`'s rel_err against the
    torch decode attention over the cache it filled; the plan's items and split sequences.
    Each layer: q/k RMSNorm + RoPE + the K/V store of its qkv row, then decode attention, as
    a decode-only step runs it (see the module docstring's Fold)."""
    ctx = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    longest = max(contexts)
    kv_bytes = 2 * sum(contexts) * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    layers = 2 if args.smoke else max(2, min(28, (8 << 30) // kv_bytes))
    work = decode_work(contexts)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(batch, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    positions = (ctx - 1).long()
    rope = RotaryEmbedding(HEAD_DIM, max(4096, longest), 1e6).to(DEVICE)
    q_norm = (1 + 0.1 * torch.randn(HEAD_DIM, generator=gen, device=DEVICE)).to(DTYPE)
    k_norm = (1 + 0.1 * torch.randn(HEAD_DIM, generator=gen, device=DEVICE)).to(DTYPE)
    caches = []
    for _ in range(layers):
        k = torch.randn(batch, longest, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        k_cache, v_cache, block_tables = paged_batch(k, torch.randn_like(k), 16, gen)
        slots = block_tables[torch.arange(batch, device=DEVICE), positions // 16].long() * 16 + positions % 16
        caches.append((k_cache, v_cache, block_tables, slots))
        del k
    outs = [torch.empty(batch, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(layers)]

    def layer(i, variant):
        k_cache, v_cache, block_tables, slots = caches[i]
        fold, fold_qkv = FOLD_VARIANTS[variant]
        if fold_qkv:
            return paged_decode_attention_qkv(qkv, positions, rope.cos, rope.sin, q_norm, k_norm, 1e-6, NUM_HEADS,
                                              k_cache, v_cache, block_tables, ctx, slots, SCALE, query_start_loc=qsl,
                                              work=work, out=outs[i], fold=fold)
        q = qk_norm_rope_store(qkv, positions, rope.cos, rope.sin, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, q_norm, k_norm,
                               1e-6, k_cache, v_cache, slots)
        return paged_decode_attention(q, k_cache, v_cache, block_tables, ctx, SCALE, out=outs[i],
                                      query_start_loc=qsl, work=work, fold=fold)

    pdl.enable(pdl.supported(qkv.device) and batch <= PDL_MAX_TOKENS)
    row = {}
    try:
        for variant in FOLD_VARIANTS:
            out = layer(0, variant).clone()
            if variant == "two":
                q = qk_norm_rope_store(qkv, positions, rope.cos, rope.sin, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                                       q_norm, k_norm, 1e-6, *caches[0][:2], caches[0][3])
                ref = torch_decode_attention(q, *caches[0][:3], ctx, SCALE)
                err, first = rel_err(out, ref), out
            eager_ms = measure(lambda: layer(0, variant))
            graph_ms = measure_graph(lambda: [layer(i, variant) for i in range(layers)])
            row[f"{variant}_layer_us"] = graph_ms and 1e3 * graph_ms / layers
            row[f"{variant}_eager_us"] = 1e3 * eager_ms
            row[f"{variant}_max_diff"] = (out.float() - first.float()).abs().max().item()
    finally:
        pdl.enable(False)
    items, index = work
    return {"B": batch, "ctx_mean": sum(contexts) / batch, "layers": layers,
            "items": int((items[:, 0] >= 0).sum()), "split": int((index[:, 1] > 1).sum()),
            "pdl": pdl.supported(qkv.device) and batch <= PDL_MAX_TOKENS, "rel_err": err, **row}


def decode_registers() -> dict:
    """{variant: "registers/spill bytes"} of the decode kernel as the engine compiles it for this
    GPU (bf16, Qwen3-0.6B heads, pages of 16, work list, PDL and prefetch on)."""
    if DEVICE == "cpu":
        return {}
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    pa = importlib.import_module("engine.kernels.paged_attention")
    sig = pa.decode_signature()
    major, minor = torch.cuda.get_device_capability()
    out = {}
    for name, (fold, qkv) in FOLD_VARIANTS.items():
        const = dict(GROUP=2, GROUP_PAD=16, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_N=64,
                     TILE_IN_PAGE=False, USE_WORK=True, USE_QSL=True, PRECISION="tf32", UPCAST=False,
                     PDL=major >= 9, PREFETCH=major >= 9, PART_ELEMS=2048, PART_BYTES=4096, PAGES=8,
                     FOLD=fold, MERGE_G=2, MERGE_S=16, QKV=qkv, QK_NORM=qkv)
        try:
            kernel = triton.compile(ASTSource(fn=pa._decode_kernel, signature={**sig, **{k: "constexpr" for k in const}},
                                              constexprs=const), target=GPUTarget("cuda", 10 * major + minor, 32),
                                    options={"num_warps": pa.DECODE_NUM_WARPS, "num_stages": pa.DECODE_NUM_STAGES})
            kernel._init_handles()
            out[name] = f"{kernel.n_regs}/{kernel.n_spills}"
        except Exception as e:   # another Triton's compile API: the timings stand without it
            out[name] = f"? ({type(e).__name__})"
    return out


def bench_fold(gen):
    rng = np.random.default_rng(0)
    batches = [1, 3] if args.smoke else FOLD_BATCHES
    rows = [fold_layer_us(b, rng.integers(120, 200, b).tolist() if args.smoke else
                          rng.integers(768, 1281, b).tolist(), gen) for b in batches]
    regs = decode_registers()
    print("\nfold: a decode layer's RoPE + KV store and split-KV attention, us per layer (CUDA graph of "
          "`layers` layers); two = RoPE/store, decode, merge kernels; fold = merge in the decode kernel; "
          "qkv = RoPE/store in it; fold_qkv = all in one")
    print("decode kernel registers/spills: " + ", ".join(f"{v} {regs.get(v, '-')}" for v in FOLD_VARIANTS))
    print(f"{'B':>4} {'ctx':>6} {'items':>5} {'split':>5} {'pdl':>4} {'layers':>6} "
          + " ".join(f"{v + '_us':>11}" for v in FOLD_VARIANTS) + f" {'best/two':>8} "
          + " ".join(f"{'eager_' + v:>14}" for v in FOLD_VARIANTS) + f" {'rel_err':>8} {'max_diff':>8}")
    for r in rows:
        times = [r[f"{v}_layer_us"] for v in FOLD_VARIANTS]
        ratio = min(times) / times[0] if all(times) else None
        print(f"{r['B']:>4} {r['ctx_mean']:>6.0f} {r['items']:>5} {r['split']:>5} {str(r['pdl'])[0]:>4} "
              f"{r['layers']:>6} " + " ".join(fmt(t, "11.2f") for t in times) + f" {fmt(ratio, '8.3f')} "
              + " ".join(f"{r[f'{v}_eager_us']:>14.1f}" for v in FOLD_VARIANTS)
              + f" {r['rel_err']:>8.1e} {max(r[f'{v}_max_diff'] for v in FOLD_VARIANTS):>8.1e}")
    return {"rows": rows, "registers": regs}


OVERLAP_CASES = ((64, 2048), (64, 512), (64, 128), (256, 512))   # (decodes, prompt tokens)


def overlap_row(batch, prompt, gen) -> dict:
    """One row of the overlap table (see the module docstring's Overlap)."""
    rng = np.random.default_rng(batch * 7 + prompt)
    contexts = (rng.integers(120, 200, batch) if args.smoke else rng.integers(768, 1281, batch)).tolist()
    kv_bytes = 2 * (sum(contexts) + prompt) * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    layers = 2 if args.smoke else max(2, min(16, (6 << 30) // kv_bytes))
    ctx = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    work = decode_work(contexts)
    q_dec = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    q_pre = torch.randn(prompt, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    p_ctx = torch.tensor([prompt], dtype=torch.int32, device=DEVICE)
    p_qsl = torch.tensor([0, prompt], dtype=torch.int32, device=DEVICE)
    tiles = tile_list(prompt, prefill_tile_tokens(NUM_HEADS, NUM_KV_HEADS, DTYPE), batch + prompt)
    caches = []
    for _ in range(layers):
        k = torch.randn(batch, max(contexts), NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        dec = paged_batch(k, torch.randn_like(k), 16, gen)
        k = torch.randn(1, prompt, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        v = torch.randn_like(k)
        if not caches:   # layer 0's prompt attention, for the check
            ref_pre = torch.nn.functional.scaled_dot_product_attention(
                q_pre.unsqueeze(0).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=SCALE,
                is_causal=True, enable_gqa=True).transpose(1, 2)[0]
        caches.append((dec, paged_batch(k, v, 16, gen)))
        del k, v
    outs = [(torch.empty_like(q_dec), torch.empty_like(q_pre)) for _ in range(layers)]
    side = torch.cuda.Stream() if DEVICE == "cuda" else None

    def decode(i):
        k_cache, v_cache, block_tables = caches[i][0]
        paged_decode_attention(q_dec, k_cache, v_cache, block_tables, ctx, SCALE, out=outs[i][0],
                               query_start_loc=qsl, work=work)

    def prefill(i, launch=PREFILL_LAUNCH):
        k_cache, v_cache, block_tables = caches[i][1]
        paged_prefill_attention(q_pre, k_cache, v_cache, block_tables, p_ctx, p_qsl, 0, SCALE,
                                out=outs[i][1], tiles=tiles, launch=launch)

    def streams(i, launch=PREFILL_LAUNCH):   # fork: the decodes on the side stream; join before the layer ends
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            decode(i)
        prefill(i, launch)
        main.wait_stream(side)

    # one prefill program per SM at a time leaves an SM's registers to a decode program
    # (two fill them: PrefillLaunch's docstring)
    narrow = dataclasses.replace(PREFILL_LAUNCH, programs_per_sm=1)
    variants = {"decode": [decode], "prefill": [prefill], "serial": [decode, prefill],
                "prefill_1": [lambda i: prefill(i, narrow)]}
    if side is not None:
        variants["streams"] = [streams]
        variants["streams_1"] = [lambda i: streams(i, narrow)]
    row = {"B": batch, "prompt": prompt, "ctx_mean": sum(contexts) / batch, "layers": layers}
    first = None
    for name, calls in variants.items():
        run = lambda calls=calls: [call(i) for i in range(layers) for call in calls]   # noqa: E731
        run()
        if name in ("serial", "prefill_1", "streams", "streams_1"):   # serial first: the reference
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            got = torch.cat([torch.cat([o[0].flatten(), o[1].flatten()]) for o in outs]).float()
            if first is None:
                first = got.clone()
            row["max_diff"] = (got - first).abs().max().item()
        graph_ms = measure_graph(run)
        row[f"{name}_us"] = graph_ms and 1e3 * graph_ms / layers
    ref_dec = torch_decode_attention(q_dec, *caches[0][0], ctx, SCALE)
    row["rel_err"] = max(rel_err(outs[0][0], ref_dec), rel_err(outs[0][1], ref_pre))
    if row.get("streams_us"):
        row["ideal_us"] = max(row["decode_us"], row["prefill_us"])
        row["saved_us"] = row["serial_us"] - min(row["streams_us"], row["streams_1_us"])
    return row


def bench_overlap(gen) -> list[dict]:
    cases = ((2, 24), (3, 40)) if args.smoke else OVERLAP_CASES
    rows = [overlap_row(b, p, gen) for b, p in cases]
    print("\noverlap: a mixed step's attention, B decodes (ctx 768..1280) + one P-token prompt, us per layer "
          "(CUDA graph of `layers` layers); streams = the decode kernel on a second stream; ideal = max(decode, prefill)")
    print(f"{'B':>4} {'P':>5} {'layers':>6} {'decode_us':>10} {'prefill_us':>10} {'prefill_1':>10} "
          f"{'serial_us':>10} {'streams_us':>10} {'streams_1':>10} {'ideal_us':>9} {'saved_us':>9} {'saved%':>7} "
          f"{'rel_err':>8} {'max_diff':>8}")
    for r in rows:
        saved = r.get("saved_us")
        pct = 100 * saved / r["serial_us"] if saved is not None else None
        print(f"{r['B']:>4} {r['prompt']:>5} {r['layers']:>6} {fmt(r['decode_us'], '10.1f')} "
              f"{fmt(r['prefill_us'], '10.1f')} {fmt(r['prefill_1_us'], '10.1f')} {fmt(r['serial_us'], '10.1f')} "
              f"{fmt(r.get('streams_us'), '10.1f')} {fmt(r.get('streams_1_us'), '10.1f')} "
              f"{fmt(r.get('ideal_us'), '9.1f')} {fmt(saved, '9.1f')} {fmt(pct, '7.1f')} "
              f"{r['rel_err']:>8.1e} {r['max_diff']:>8.1e}")
    return rows


def check_cuda_graph(gen):
    """Capture decode once (explicit num_splits), replay with new inputs copied into the static
    buffers, compare with eager. Returns the max abs difference over two replays."""
    if DEVICE == "cpu":
        return None
    batch, ctx, block_size = 64, 1024, 16
    k = torch.randn(batch, ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    v = torch.randn_like(k)
    k_cache, v_cache, block_tables = paged_batch(k, v, block_size, gen)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    num_splits = choose_num_splits(batch, NUM_KV_HEADS, ctx, _num_sms())
    out = torch.empty_like(q)
    call = lambda: paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, SCALE, num_splits, out=out)  # noqa: E731
    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    worst = 0.0
    for new_len in (ctx, 300):
        q.copy_(torch.randn(q.shape, device=DEVICE, dtype=DTYPE))
        context_lens.fill_(new_len)
        graph.replay()
        eager = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, SCALE, num_splits)
        worst = max(worst, (out.float() - eager.float()).abs().max().item())
    return worst


def sweep(gen):
    """Time each decode launch-constant combination of engine/kernels/paged_attention.py (the
    module globals the wrapper reads at call time) on the shapes that matter; the defaults are
    restored. (The prefill kernel's launches are the prefill stage's PREFILL_CANDIDATES.)"""
    pa = importlib.import_module("engine.kernels.paged_attention")
    saved = {name: getattr(pa, name) for name in ("DECODE_BLOCK_N", "DECODE_NUM_WARPS", "DECODE_NUM_STAGES")}
    if args.smoke:
        decode_shapes, grid = [(2, 300, 16)], [(32, 4, 2)]
    else:
        decode_shapes = [(256, 1024, 16), (64, 4096, 16), (256, 1024, 256), (8, 4096, 16)]
        grid = list(itertools.product([32, 64, 128], [4, 8], [2, 3, 4]))
    rows = []
    try:
        for batch, ctx, block_size in decode_shapes:
            q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
            k = torch.randn(batch, ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
            k_cache, v_cache, block_tables = paged_batch(k, torch.randn_like(k), block_size, gen)
            context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
            kv_bytes = 2 * k.numel() * k.element_size()
            del k
            for block_n, warps, stages in grid:
                pa.DECODE_BLOCK_N, pa.DECODE_NUM_WARPS, pa.DECODE_NUM_STAGES = block_n, warps, stages
                try:
                    ms = measure(lambda: paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, SCALE))
                    rows.append({"kernel": "decode", "shape": f"B={batch} ctx={ctx} block={block_size}",
                                 "config": f"BLOCK_N={block_n} warps={warps} stages={stages}",
                                 "us": ms * 1e3, "GBps": kv_bytes / (ms * 1e-3) / 1e9})
                except Exception as e:  # e.g. out of shared memory
                    print(f"  decode BLOCK_N={block_n} warps={warps} stages={stages}: {type(e).__name__}")
            del k_cache, v_cache
    finally:
        for name, value in saved.items():
            setattr(pa, name, value)
    print("\nsweep (best 5 per shape; current defaults: decode BLOCK_N={DECODE_BLOCK_N} warps={DECODE_NUM_WARPS} "
          "stages={DECODE_NUM_STAGES})".format(**saved))
    for (kernel, shape), group in itertools.groupby(rows, key=lambda r: (r["kernel"], r["shape"])):
        for r in sorted(group, key=lambda r: r["us"])[:5]:
            print(f"  {kernel:>7} {shape:>28}  {r['config']:<44} {r['us']:>9.1f} us  {r['GBps']:.0f} GB/s")
    return rows


def _num_sms():
    return torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 132


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (TRITON_INTERPRET=1)"
    tables = "decode" in STAGES or "prefill" in STAGES
    fi, fi_version = flashinfer_module() if tables else (None, "skipped")
    copy_gbps = copy_ceiling_gbps(64 << 20 if args.smoke else 4 << 30) if "decode" in STAGES else None
    print(f"device: {device_name}   dtype: {DTYPE}   heads {NUM_HEADS}/{NUM_KV_HEADS} x {HEAD_DIM}   "
          f"copy ceiling: {fmt(copy_gbps, '.0f')} GB/s   flashinfer: {fi_version}   stages: {','.join(STAGES)}")
    decode = print_decode(bench_decode(fi, copy_gbps, gen)) if "decode" in STAGES else []
    peak = matmul_peak_tflops() if "prefill" in STAGES else None
    prefill = print_prefill(bench_prefill(fi, gen, peak), peak) if "prefill" in STAGES else []
    graph_diff = check_cuda_graph(gen) if "decode" in STAGES else None
    fold = bench_fold(gen) if "fold" in STAGES else None
    overlap = bench_overlap(gen) if "overlap" in STAGES else None
    sweep_rows = sweep(gen) if args.sweep else None
    blocks, cost, failed = None, None, None
    if "blocks" in STAGES:
        blocks = bench_blocks(gen)
        cost = block_cost(blocks)
        print_blocks(blocks, cost)
        tol = 1e-4 if DTYPE == torch.float32 else 3e-2
        wrong = [f"{r['kernel']} {r['point']}" for r in blocks if not r["rel_err"] <= tol]
        if wrong:   # never hand the cost model the speed of a wrong result
            failed = f"rel_err vs SDPA above {tol:g} at {', '.join(wrong)}"
            print(f"\nERROR: {failed}; no hardware file written")
        note = (f"Attention time by KV block size / time at block {REFERENCE_BLOCK} (time-weighted over its points),\n"
                f"measured by `benchmarks/bench_attention.py --stages blocks` on {device_name}, {DTYPE}, "
                f"{time.strftime('%Y-%m-%d')}.")
        for path in [] if wrong else args.write_hardware:
            write_block_cost(path, cost, note)
            print(f"wrote attention_block_cost into {path}")
    notes = sorted({r["flashinfer_note"] for r in decode if r["flashinfer_note"]})
    if notes:
        print("\nflashinfer notes:", *notes, sep="\n  ")
    if "decode" in STAGES:
        print(f"\ncuda graph replay max |diff| vs eager: {fmt(graph_diff, '.2e')}")
    print(json.dumps({"bench": "attention", "device": device_name, "dtype": str(DTYPE),
                      "torch": torch.__version__, "triton": triton.__version__, "flashinfer": fi_version,
                      "stages": STAGES, "copy_GBps": copy_gbps, "cuda_graph_max_diff": graph_diff,
                      "matmul_peak_TFLOPs": peak, "prefill_engine_launch": launch_name(PREFILL_LAUNCH),
                      "decode": decode, "prefill": prefill, "sweep": sweep_rows,
                      "block_cost": cost, "blocks": blocks, "fold": fold, "overlap": overlap}))
    if failed:
        sys.exit(failed)


def print_decode(decode):
    print("\ndecode")
    print(f"{'B':>4} {'ctx':>5} {'block':>5} {'splits':>6} {'us':>9} {'graph_us':>9} {'GB/s':>7} {'%copy':>6} "
          f"{'rel_err':>8} {'flashinfer_us':>13} {'sdpa_dense_us':>13}")
    for r in decode:
        print(f"{r['B']:>4} {r['ctx']:>5} {r['block']:>5} {r['splits']:>6} {r['us']:>9.1f} {fmt(r['graph_us'], '9.1f')} "
              f"{r['GBps']:>7.0f} {fmt(r['pct_copy'], '6.1f')} {r['rel_err']:>8.1e} "
              f"{fmt(r['flashinfer_us'], '13.1f')} {r['sdpa_dense_us']:>13.1f}")
    return decode


if __name__ == "__main__":
    main()
