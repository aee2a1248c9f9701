"""Skinny GEMM: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for the decode regime (M <= 64 rows),
W row-major as torch.nn.Linear stores it; x, W and y in one dtype (bf16 / fp16; fp32 runs
too, with IEEE dots, for tests), accumulation in fp32.

A decode step's GEMMs read every weight byte once and do almost no arithmetic per byte, so
the kernel is built for HBM bandwidth alone:
  - each program streams a [BLOCK_N, BLOCK_K] tile of W per K step (BLOCK_N rows of W, each
    contiguous along K) and holds all M rows of x, padded to BLOCK_M = 16, 32 or 64 for the
    tensor cores. The dot is "swapped": acc[BLOCK_N, BLOCK_M] += W_tile @ x_tile^T, so the
    weight tile is the wide operand (64 rows: one Hopper warpgroup MMA) and M only pads the
    narrow one. One code path for every M: even at M = 1 the padded MMA costs far less than
    the weight read, and the weight tile goes through the load pipeline either way (an FMA
    path for M <= 4 would be a second kernel to keep right for no bandwidth gain);
  - split-K over a second grid axis when N / BLOCK_N tiles alone are too few programs to
    keep every SM's loads in flight (o_proj and down_proj: N = hidden size);
  - the split-K reduction happens inside the same launch: each split writes its fp32 partial
    tile to a workspace, bumps the tile's arrival counter, and the split that arrives last
    sums the partials in split order (deterministic), adds the bias, casts and stores y, and
    resets the counter for the next call. One kernel per GEMM, no memset, no reduce kernel:
    at batch 1 a Qwen3-0.6B GEMM moves 4-13 MB (1-3 us of HBM time), so a second launch
    would cost as much as the read.
  - the MLP's down projection can take the gate_up output [M, 2K] and apply SiLU-and-mul
    to each x tile as it loads it (`swiglu=True`): the activation kernel's launch goes, and
    the numbers are bit for bit those of engine.kernels.fused.silu_and_mul (one shared
    definition, `silu_mul`). x is tiny at decode, so recomputing it per program is free.

Capture-safe: no host synchronization; the allocations are y (shape from x and W only) and,
on first use at a size, the per-device workspace, which is never freed (graphs keep its
address) and which `choose_skinny_gemm` sizes before capture. Calls on a device must be
stream-ordered (they share the workspace), as the engine's single stream is.

`choose_skinny_gemm(model)` is the load-time measurement: for each (weight shape, M) it
times the kernel against torch's F.linear under CUDA graphs, over all layers of that shape
(so weights come from HBM, as in a step), and records on each layer, per measured M,
whether (and at which split) the kernel won; engine.layers.linear.dense_linear dispatches
on it.

Launch constants are host rules below, set from the arithmetic (tile bytes, programs per
SM), not yet from timings: `benchmarks/bench_gemm.py --sweep` times the alternatives.
"""
import functools
import os
import statistics

import torch
import triton
import triton.language as tl

from engine.kernels.fused import silu_and_mul, silu_mul

MAX_M = 64                 # rows the kernel takes (the decode regime)
BLOCK_N = 64               # W rows per program: the wide MMA operand (one warpgroup on sm_90)
BLOCK_K = 128              # K per step: a 16 KB bf16 weight tile
NUM_WARPS = 4
NUM_STAGES = 4             # K steps in flight per program (cp.async pipeline); 3 at BLOCK_M 64
PROGRAMS_PER_SM = 2        # split K until about this many programs per SM
MIN_K_PER_SPLIT = 256      # ... keeping at least this much K per program
MAX_SPLIT_K = 16
MIN_GAIN = 0.02            # choose_skinny_gemm keeps cuBLAS unless the kernel is 2% faster

# The Triton interpreter (TRITON_INTERPRET=1, the CPU tests) multiplies the raw bits of bf16
# tl.dot operands: there the kernel upcasts to fp32 first (exact for bf16 products).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _store_y(y_ptr, bias_ptr, acc, offs_n, offs_m, mask_n, mask_m, stride_ym,
             HAS_BIAS: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] fp32 (+ bias[n]) -> y[m, n] in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None],
             acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


# M is not specialized (Triton would compile M == 1 and M % 16 == 0 apart): the LM head sees
# any row count, and a variant compiled mid-run stalls the engine for a second
@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, partial_ptr, arrivals_ptr,
                        M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
                        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                        SWIGLU: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """SWIGLU: x is [M, 2K] = [gate | up] and the A operand is silu(gate) * up, computed per
    tile as engine.kernels.fused.silu_and_mul computes it (the MLP's down projection without
    a separate activation kernel)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    rows = offs_n.to(tl.int64)   # N * K may pass 2^31 (LM heads of large vocabularies)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        w = tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        x_tile = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]   # x^T tile
        mask_x = mask_k[:, None] & mask_m[None, :]
        if SWIGLU:
            xt = silu_mul(tl.load(x_tile, mask=mask_x, other=0.0),
                          tl.load(x_tile + K, mask=mask_x, other=0.0))
        else:
            xt = tl.load(x_tile, mask=mask_x, other=0.0)
        if IEEE:   # fp32 inputs (no TF32), or bf16 on the interpreter
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w, xt)
    if SPLIT:
        # partial[split, tile] is an fp32 [BLOCK_M, BLOCK_N] block (rows m < M written)
        tile = pid_n * BLOCK_N * BLOCK_M + offs_m[None, :] * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        split_stride = tl.num_programs(0) * BLOCK_N * BLOCK_M
        tl.store(partial_ptr + pid_k * split_stride + tile, acc, mask=mask_m[None, :])
        # every thread's partial is written before the counter moves (the release below is
        # one thread's; the barrier orders the others' stores before it)
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + pid_n, 1, sem="acq_rel")
        if arrived == tl.num_programs(1) - 1:   # the last split of this tile: reduce
            tl.debug_barrier()
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(0, tl.num_programs(1)):
                acc += tl.load(partial_ptr + s * split_stride + tile, mask=mask_m[None, :],
                               other=0.0, cache_modifier=".cg")
            _store_y(y_ptr, bias_ptr, acc, offs_n, offs_m, mask_n, mask_m, stride_ym, HAS_BIAS)
            tl.atomic_xchg(arrivals_ptr + pid_n, 0)   # ready for the next call
    else:
        _store_y(y_ptr, bias_ptr, acc, offs_n, offs_m, mask_n, mask_m, stride_ym, HAS_BIAS)


# ---- launch rule -------------------------------------------------------------------------

@functools.cache
def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def default_split_k(n: int, k: int, sms: int, block_n: int = BLOCK_N) -> int:
    """Split K until the grid has about PROGRAMS_PER_SM programs per SM, keeping at least
    MIN_K_PER_SPLIT of K per program. On 132 SMs: Qwen3-0.6B qkv 4, o 8, gate_up 3,
    down 12, LM head 1; Llama-3.1-8B qkv 3, o 5, gate_up 1, down 5, LM head 1."""
    tiles = triton.cdiv(n, block_n)
    by_k = max(1, k // MIN_K_PER_SPLIT)
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, tiles), by_k, MAX_SPLIT_K))


def split_candidates(n: int, k: int, sms: int) -> list[int]:
    """The split factors choose_skinny_gemm times: none, the rule's, half and twice it."""
    s = default_split_k(n, k, sms)
    return sorted({1, max(1, s // 2), s, min(2 * s, MAX_SPLIT_K, max(1, triton.cdiv(k, BLOCK_K)))})


def launch_config(m: int, n: int, k: int, split_k: int | None, sms: int,
                  config: dict | None = None) -> dict:
    """The launch constants of a call: tiles (BLOCK_N, BLOCK_K: the module's, or `config`'s
    for sweeps), warps, stages, and the split actually run (`splits`: K split into
    `k_per_split`-sized pieces, a multiple of BLOCK_K; never an empty split)."""
    # stages x (weight + x tile): 80 / 96 / 96 KB of shared memory at BLOCK_M 16 / 32 / 64
    # (sm_90 compiles), so two programs fit on an SM
    stages = NUM_STAGES if block_m(m) < 64 else NUM_STAGES - 1
    cfg = dict(BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=stages)
    cfg.update(config or {})
    split_k = split_k or default_split_k(n, k, sms, cfg["BLOCK_N"])
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    cfg.update(BLOCK_M=block_m(m), k_per_split=k_per_split, splits=triton.cdiv(k, k_per_split),
               tiles=triton.cdiv(n, cfg["BLOCK_N"]))
    return cfg


# ---- workspace ---------------------------------------------------------------------------

_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[torch.Tensor] = []   # outgrown workspaces: captured graphs may still use them


def workspace(device: torch.device, partial_numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partial sums, int32 arrival counters, all zero) of at least these sizes; grown,
    never freed: a CUDA graph keeps the address it captured."""
    partial, arrivals = _WORKSPACES.get(device, (None, None))
    if partial is None or partial.numel() < partial_numel or arrivals.numel() < tiles:
        if partial is not None:
            _RETIRED.extend((partial, arrivals))
        size = max(partial_numel, 0 if partial is None else partial.numel())
        count = max(tiles, 0 if arrivals is None else arrivals.numel())
        partial = torch.empty(size, dtype=torch.float32, device=device)
        arrivals = torch.zeros(count, dtype=torch.int32, device=device)
        _WORKSPACES[device] = partial, arrivals
    return partial, arrivals


# ---- the call ----------------------------------------------------------------------------

def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                split_k: int | None = None, config: dict | None = None,
                swiglu: bool = False) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias [N]) -> [M, N] in x's dtype, for 1 <= M <= MAX_M.
    split_k: K splits (None: the launch rule); fewer run where K has fewer BLOCK_K steps.
    config: launch constants to override (BLOCK_N, BLOCK_K, num_warps, num_stages: sweeps).
    swiglu: x is [M, 2K] = [gate | up] (the MLP's gate_up output) and the product is
    silu(gate) * up @ weight^T, bit for bit engine.kernels.fused.silu_and_mul(x) then the
    kernel, in one launch."""
    k = weight.shape[1] if weight.dim() == 2 else -1
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != (2 * k if swiglu else k):
        raise ValueError(f"skinny_gemm: x {tuple(x.shape)} and weight {tuple(weight.shape)} "
                         f"must be [M, {'2K' if swiglu else 'K'}] and [N, K]")
    m, n = x.shape[0], weight.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"skinny_gemm takes 1..{MAX_M} rows, got {m}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"skinny_gemm: x ({x.dtype}), weight ({weight.dtype}) and bias "
                         f"({None if bias is None else bias.dtype}) must share a dtype")
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    cfg = launch_config(m, n, k, split_k, num_sms(x.device), config)
    splits, tiles = cfg.pop("splits"), cfg.pop("tiles")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = arrivals = y   # unused without split-K
    if splits > 1:
        partial, arrivals = workspace(x.device, splits * tiles * cfg["BLOCK_N"] * cfg["BLOCK_M"], tiles)
    _skinny_gemm_kernel[(tiles, splits)](
        x, weight, weight if bias is None else bias, y, partial, arrivals,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0), cfg.pop("k_per_split"),
        HAS_BIAS=bias is not None, SPLIT=splits > 1, IEEE=x.dtype == torch.float32 or _INTERPRETED,
        SWIGLU=swiglu, **cfg)
    return y


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  split_k: int | None = None, swiglu: bool = False) -> torch.Tensor:
    """F.linear's contract (x [..., K]) on the skinny kernel; swiglu: x [..., 2K] = [gate |
    up], see skinny_gemm."""
    shape = x.shape
    y = skinny_gemm(x.reshape(-1, shape[-1]), weight, bias, split_k, swiglu=swiglu)
    return y.view(*shape[:-1], y.shape[-1])


# ---- the load-time choice ----------------------------------------------------------------

def graph_time_us(fn, repeats: int) -> float:
    """Median microseconds of one replay of a CUDA graph of fn() (run once eagerly first:
    compiles, workspace)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def skinny_layers(model: torch.nn.Module, device_type: str = "cuda") -> dict[tuple, list[torch.nn.Module]]:
    """(N, K, dtype, has bias, swiglu) -> the layers of that shape the kernel may serve: modules
    with a `skinny` plan slot (engine.layers.linear.LinearBase, engine.layers.embed_head.
    ParallelLMHead) whose dense 2-D weight is bf16 / fp16 on `device_type` (quantized layers
    keep their own kernels). swiglu: the layer's `swiglu_input` (an MLP's down projection,
    which takes the gate_up output and applies SiLU-and-mul itself)."""
    groups: dict[tuple, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (not hasattr(module, "skinny") or getattr(module, "quant", None) is not None
                or not isinstance(weight, torch.Tensor) or weight.dim() != 2
                or weight.device.type != device_type
                or weight.dtype not in (torch.bfloat16, torch.float16)):
            continue
        key = (*weight.shape, weight.dtype, getattr(module, "bias", None) is not None,
               getattr(module, "swiglu_input", False))
        groups.setdefault(key, []).append(module)
    return groups


@torch.inference_mode()
def choose_skinny_gemm(model: torch.nn.Module, m_values: list[int] | None = None,
                       repeats: int = 7, device_type: str = "cuda", time_us=None) -> list[dict]:
    """Per layer shape and row count M in `m_values` (default: the CUDA-graph sizes up to
    MAX_M, policy.cuda_graphs), time F.linear and the skinny kernel (at each of
    split_candidates) under CUDA graphs, each graph one pass over every layer of the shape
    (real weights, read from HBM as in a step when they outweigh the L2), and set each layer's
    `skinny` plan: ((M, split_k or 0 where torch won), ...) ascending, which
    engine.layers.linear.dense_linear follows (a call of R rows takes the entry of the
    smallest measured M >= R; above the largest, torch). The kernel must beat torch by
    MIN_GAIN: within noise, cuBLAS stays. A down projection (`swiglu_input`) is timed like
    for like: the kernel with SiLU-and-mul in its prologue, from the [M, 2K] gate_up output,
    against engine.kernels.fused.silu_and_mul + F.linear. Call once after loading and before
    graph capture (it also sizes the workspace the captured calls use, and compiles every
    variant a call can select). Returns one row per (shape, M): the timings and the choice.
    device_type, time_us (fn -> microseconds of one fn() call): for tests on the CPU."""
    from policy.cuda_graphs import capture_sizes
    m_values = sorted({m for m in (m_values or capture_sizes(MAX_M)) if 1 <= m <= MAX_M})
    time_us = time_us or (lambda fn: graph_time_us(fn, repeats))
    report = []
    for (n, k, dtype, has_bias, swiglu), layers in skinny_layers(model, device_type).items():
        device = layers[0].weight.device
        params = [(layer.weight, getattr(layer, "bias", None)) for layer in layers]
        gen = torch.Generator(device).manual_seed(n + k)   # leaves the global RNG alone
        plan = []
        for m in m_values:
            x = torch.randn(m, 2 * k if swiglu else k, device=device, generator=gen).to(dtype)
            if swiglu:
                torch_path = lambda w, b: torch.nn.functional.linear(silu_and_mul(x), w, b)  # noqa: E731
                kernel = lambda w, b, s: skinny_gemm(x, w, b, s, swiglu=True)  # noqa: E731
            else:
                torch_path = lambda w, b: torch.nn.functional.linear(x, w, b)  # noqa: E731
                kernel = lambda w, b, s: skinny_gemm(x, w, b, s)  # noqa: E731
            torch_us = time_us(lambda: [torch_path(w, b) for w, b in params]) / len(layers)
            timed = [(time_us(lambda: [kernel(w, b, s) for w, b in params]) / len(layers), s)
                     for s in split_candidates(n, k, num_sms(device))]
            triton_us, split_k = min(timed)
            use = triton_us < (1 - MIN_GAIN) * torch_us
            plan.append((m, split_k if use else 0))
            report.append(dict(n=n, k=k, dtype=str(dtype).removeprefix("torch."), layers=len(layers),
                               swiglu=swiglu, m=m, torch_us=torch_us, triton_us=triton_us, split_k=split_k,
                               skinny=use))
        for layer in layers:
            layer.skinny = tuple(plan)
    return report
