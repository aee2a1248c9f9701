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
    definition, `silu_mul`). x is tiny at decode, so recomputing it per program is free;
  - likewise a decoder layer's qkv and gate_up projections can take the un-normed input and
    the residual stream (`skinny_gemm_rmsnorm`): every program first sums the squares of
    its rows over all of K (M x K from L2, little at decode) for RMSNorm's scale, program
    (0, 0) writes the new residual stream, and each x tile is added, normed and weighted as
    engine.kernels.fused.add_rmsnorm does, so the norm kernel's launch goes too.

Capture-safe: no host synchronization; the allocations are the outputs (y, and
skinny_gemm_rmsnorm's residual stream: shapes from x and W only) and,
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

from engine.kernels import pdl
from engine.kernels.fused import add_rmsnorm, silu_and_mul, silu_mul

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


@triton.jit
def _input_tile(x_ptr, res_ptr, offs_m, offs_k, mask_x, stride_xm, stride_rm, K,
                SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The layer input's x^T tile [BLOCK_K, BLOCK_M] (rows offs_m, columns offs_k) in x's
    dtype: x; or silu(gate) * up of x = [gate | up] (SWIGLU); or x + residual rounded to
    the dtype, the residual stream, as engine.kernels.fused.add_rmsnorm rounds it."""
    x_tile = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]
    xt = tl.load(x_tile, mask=mask_x, other=0.0)
    if SWIGLU:
        xt = silu_mul(xt, tl.load(x_tile + K, mask=mask_x, other=0.0))
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs_m[None, :] * stride_rm + offs_k[:, None], mask=mask_x, other=0.0)
        xt = (xt.to(tl.float32) + res.to(tl.float32)).to(xt.dtype)
    return xt


@triton.jit
def _row_rstd(x_ptr, res_ptr, res_out_ptr, offs_m, mask_m, stride_xm, stride_rm, stride_om, K,
              eps, write_residual, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """RMSNorm's 1 / sqrt(mean(h^2) + eps) of every row h of the layer input (x, or x +
    residual), over all K: every program recomputes it, which costs M x K reads of L2 at
    decode sizes. The program with `write_residual` also stores h, the new residual stream."""
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_x = (offs_k < K)[:, None] & mask_m[None, :]
        h = _input_tile(x_ptr, res_ptr, offs_m, offs_k, mask_x, stride_xm, stride_rm, K,
                        False, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            if write_residual:
                tl.store(res_out_ptr + offs_m[None, :] * stride_om + offs_k[:, None], h, mask=mask_x)
        hf = h.to(tl.float32)
        sq += tl.sum(hf * hf, 0)
    return 1.0 / tl.sqrt(sq / K + eps)


@triton.jit
def store_tile(acc, y_ptr, bias_ptr, partial_ptr, arrivals_ptr, pid_n, pid_k, offs_n, offs_m,
               mask_n, mask_m, stride_ym, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The end of a swapped-dot program (this kernel's and engine.kernels.w4a16's): its fp32
    acc [BLOCK_N, BLOCK_M] to y (+ bias). With split-K (SPLIT, grid axis 1) each split writes
    its partial tile to the workspace and bumps the tile's arrival counter; the split that
    arrives last sums the partials in split order (deterministic), stores y and resets the
    counter for the next call."""
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


# M is not specialized (Triton would compile M == 1 and M % 16 == 0 apart): the LM head sees
# any row count, and a variant compiled mid-run stalls the engine for a second
@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, partial_ptr, arrivals_ptr,
                        res_ptr, norm_w_ptr, res_out_ptr, eps,
                        M, N, K, stride_xm, stride_wn, stride_ym, stride_rm, stride_om, k_per_split,
                        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                        SWIGLU: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
                        ELEM_BYTES: tl.constexpr = 2):
    """The A operand (x^T tiles, `_input_tile`) is x, or:
    SWIGLU: x is [M, 2K] = [gate | up] and the operand silu(gate) * up, computed per tile as
    engine.kernels.fused.silu_and_mul computes it (an MLP's down projection without its
    activation kernel);
    NORM: the operand is RMSNorm(h) * norm_w with h = x (+ residual with HAS_RESIDUAL),
    rounded as engine.kernels.fused.add_rmsnorm rounds it (a decoder layer's qkv or gate_up
    projection without its norm kernel); program (0, 0) writes h to res_out."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    rows = offs_n.to(tl.int64)   # N * K may pass 2^31 (LM heads of large vocabularies)
    if PREFETCH:   # launched early (PDL): pull this program's weight slice into L2 meanwhile
        first = tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn + k_start
        nbytes = tl.zeros((BLOCK_N,), dtype=tl.int32) + ((k_end - k_start) * ELEM_BYTES) // 16 * 16
        pdl.prefetch_rows_l2(w_ptr + first, nbytes, PDL)
    pdl.enter(PDL)               # x, the residual and the workspace come from earlier kernels
    if NORM:
        rstd = _row_rstd(x_ptr, res_ptr, res_out_ptr, offs_m, mask_m, stride_xm, stride_rm,
                         stride_om, K, eps, (pid_n == 0) & (pid_k == 0), HAS_RESIDUAL, BLOCK_M,
                         BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        w = tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        xt = _input_tile(x_ptr, res_ptr, offs_m, offs_k, mask_k[:, None] & mask_m[None, :],
                         stride_xm, stride_rm, K, SWIGLU, HAS_RESIDUAL)
        if NORM:
            nw = tl.load(norm_w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            normed = (xt.to(tl.float32) * rstd[None, :]).to(xt.dtype).to(tl.float32)
            xt = (normed * nw[:, None]).to(xt.dtype)
        if IEEE:   # fp32 inputs (no TF32), or bf16 on the interpreter
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w, xt)
    store_tile(acc, y_ptr, bias_ptr, partial_ptr, arrivals_ptr, pid_n, pid_k, offs_n, offs_m,
               mask_n, mask_m, stride_ym, HAS_BIAS, SPLIT, BLOCK_N, BLOCK_M)


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
_RETIRED: dict[torch.device, list[torch.Tensor]] = {}   # outgrown: captured graphs may still use them


def workspace(device: torch.device, partial_numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partial sums, int32 arrival counters, all zero) of at least these sizes; grown,
    never freed: a CUDA graph keeps the address it captured."""
    partial, arrivals = _WORKSPACES.get(device, (None, None))
    if partial is None or partial.numel() < partial_numel or arrivals.numel() < tiles:
        if partial is not None:
            _RETIRED.setdefault(device, []).extend((partial, arrivals))
        size = max(partial_numel, 0 if partial is None else partial.numel())
        count = max(tiles, 0 if arrivals is None else arrivals.numel())
        partial = torch.empty(size, dtype=torch.float32, device=device)
        arrivals = torch.zeros(count, dtype=torch.int32, device=device)
        _WORKSPACES[device] = partial, arrivals
    return partial, arrivals


def drop_buffers(device: torch.device) -> None:
    """Forget the device's workspaces (engine.kernels.buffers: no graph uses them any more)."""
    _WORKSPACES.pop(device, None)
    _RETIRED.pop(device, None)


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
    return _launch(x, weight, bias, split_k, config, swiglu)


def skinny_gemm_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                        eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        split_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """engine.kernels.fused.add_rmsnorm(x, norm_weight, eps, residual) followed by
    skinny_gemm, in one launch: returns (RMSNorm(h) @ weight^T (+ bias), h) with h = x +
    residual (the residual stream; h = x itself when residual is None). x, residual [M, K],
    norm_weight [K]. Equal to the two kernels up to the order in which the rows' squares are
    summed for RMSNorm (here in BLOCK_K pieces), which may move a rounding of the output."""
    if x.dim() != 2 or norm_weight.shape != (x.shape[1],) or (
            residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype)):
        raise ValueError(f"skinny_gemm_rmsnorm: x {tuple(x.shape)}, residual "
                         f"{None if residual is None else tuple(residual.shape)} and norm weight "
                         f"{tuple(norm_weight.shape)} must be [M, K], [M, K] (x's dtype) and [K]")
    residual = None if residual is None else (residual if residual.stride(1) == 1 else residual.contiguous())
    res_out = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    y = _launch(x, weight, bias, split_k, None, False, (residual, norm_weight, eps, res_out))
    return y, res_out


def _launch(x, weight, bias, split_k, config, swiglu, norm=None):
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
    residual, norm_weight, eps, res_out = norm or (None, None, 0.0, None)
    residual = residual if residual is not None else x          # unused without a residual
    _skinny_gemm_kernel[(tiles, splits)](
        x, weight, weight if bias is None else bias, y, partial, arrivals,
        residual, weight if norm_weight is None else norm_weight, x if res_out is None else res_out, eps,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0), residual.stride(0),
        x.stride(0) if res_out is None else res_out.stride(0), cfg.pop("k_per_split"),
        HAS_BIAS=bias is not None, SPLIT=splits > 1, IEEE=x.dtype == torch.float32 or _INTERPRETED,
        SWIGLU=swiglu, NORM=norm is not None, HAS_RESIDUAL=norm is not None and norm[0] is not None,
        PDL=pdl.enabled(), PREFETCH=pdl.enabled() and _aligned(weight), ELEM_BYTES=weight.element_size(),
        **cfg, **pdl.launch_kwargs())
    return y


def _aligned(weight: torch.Tensor) -> bool:
    """Every program's weight slice starts on 16 bytes (what a bulk L2 prefetch needs):
    k_per_split is a multiple of BLOCK_K, so the base and the row stride decide."""
    return weight.data_ptr() % 16 == 0 and weight.stride(0) * weight.element_size() % 16 == 0


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  split_k: int | None = None, swiglu: bool = False) -> torch.Tensor:
    """F.linear's contract (x [..., K]) on the skinny kernel; swiglu: x [..., 2K] = [gate |
    up], see skinny_gemm."""
    shape = x.shape
    y = skinny_gemm(x.reshape(-1, shape[-1]), weight, bias, split_k, swiglu=swiglu)
    return y.view(*shape[:-1], y.shape[-1])


# ---- the load-time choice ----------------------------------------------------------------

def graph_time_us(fn, repeats: int, flush=None) -> float:
    """Median microseconds of one replay of a CUDA graph of fn() (run once eagerly first:
    compiles, workspace). flush: run before each timed replay, outside the timing (l2_flush)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def l2_flush(device: torch.device):
    """A function that reads twice the device's L2 in other data (a read: no dirty lines
    to write back during what is timed next), so the next replay finds none of its weights
    in L2, as in a step, where the layers before wash it. One replay of a graph over a single
    layer whose weights exceed the L2 (the LM head: 311 MB at Qwen3-0.6B) would otherwise
    find part of them left there by the replay before."""
    size = 2 * getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    scratch = torch.zeros(size // 2, dtype=torch.float16, device=device)
    return lambda: scratch.amax()


def skinny_layers(model: torch.nn.Module, device_type: str = "cuda") -> dict[tuple, list[torch.nn.Module]]:
    """(N, K, dtype, has bias, swiglu, norm) -> the layers of that shape the kernel may serve:
    modules with a `skinny` plan slot (engine.layers.linear.LinearBase, engine.layers.
    embed_head.ParallelLMHead) whose dense 2-D weight is bf16 / fp16 on `device_type`
    (quantized layers keep their own kernels). swiglu: the layer's `swiglu_input` (an MLP's
    down projection, which takes the gate_up output and applies SiLU-and-mul itself); norm:
    its `norm_input` (a projection after an RMSNorm, which the kernel can compute)."""
    groups: dict[tuple, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (not hasattr(module, "skinny") or getattr(module, "quant", None) is not None
                or not isinstance(weight, torch.Tensor) or weight.dim() != 2
                or weight.device.type != device_type
                or weight.dtype not in (torch.bfloat16, torch.float16)):
            continue
        key = (*weight.shape, weight.dtype, getattr(module, "bias", None) is not None,
               getattr(module, "swiglu_input", False), getattr(module, "norm_input", False))
        groups.setdefault(key, []).append(module)
    return groups


@torch.inference_mode()
def choose_skinny_gemm(model: torch.nn.Module, m_values: list[int] | None = None,
                       repeats: int = 7, device_type: str = "cuda", time_us=None,
                       pdl_rows: int = 0) -> list[dict]:
    """Per layer shape and row count M in `m_values` (default: the CUDA-graph sizes up to
    MAX_M, policy.cuda_graphs), time F.linear and the skinny kernel (at each of
    split_candidates) under CUDA graphs, each graph one pass over every layer of the shape
    (real weights, read from HBM as in a step: the L2 is washed before each replay,
    l2_flush), and set each layer's `skinny` plan: ((M, split_k or 0 where torch won), ...)
    ascending, which
    engine.layers.linear.dense_linear follows (a call of R rows takes the entry of the
    smallest measured M >= R; above the largest, torch). The kernel must beat torch by
    MIN_GAIN: within noise, cuBLAS stays. A down projection (`swiglu_input`) is timed on
    silu_and_mul's output like any layer, and also gets a `skinny_swiglu` plan: per M, the
    split at which the kernel with SiLU-and-mul in its prologue (from the [M, 2K] gate_up
    output) beats silu_and_mul + the path just chosen by MIN_GAIN, else 0. A projection after an RMSNorm
    (`norm_input`: a decoder layer's qkv and gate_up) also gets a `skinny_norm` plan: per M,
    the split at which skinny_gemm_rmsnorm (residual add, norm and GEMM in one launch) beats
    add_rmsnorm + the path just chosen by MIN_GAIN, else 0
    (engine.layers.linear.LinearBase.forward_rmsnorm follows it). Call once after loading and
    before graph capture (it also sizes the workspace the captured calls use, and compiles every
    variant a call can select). Returns one row per (shape, M): the timings and the choice.
    pdl_rows: the row counts up to which the engine's steps launch with programmatic
    dependent launch (EngineConfig.pdl_max_tokens where PDL is on, engine.kernels.pdl): the
    kernels of those M are timed with it on, weight prefetch included, as the step's graphs
    run them (each row's `pdl`); the others with it off.
    device_type, time_us (fn -> microseconds of one fn() call): for tests on the CPU."""
    from policy.cuda_graphs import capture_sizes
    m_values = sorted({m for m in (m_values or capture_sizes(MAX_M)) if 1 <= m <= MAX_M})
    groups = skinny_layers(model, device_type)
    if time_us is None and groups:
        flush = l2_flush(next(iter(groups.values()))[0].weight.device)
        time_us = lambda fn: graph_time_us(fn, repeats, flush)   # noqa: E731
    pdl_was = pdl.enabled()
    try:
        return _choose(groups, m_values, time_us, pdl_rows)
    finally:
        pdl.enable(pdl_was)


def _choose(groups, m_values, time_us, pdl_rows) -> list[dict]:
    """choose_skinny_gemm's measurement over skinny_layers' groups: sets the plans, returns
    the report rows."""
    report = []
    for (n, k, dtype, has_bias, swiglu, norm), layers in groups.items():
        device = layers[0].weight.device
        params = [(layer.weight, getattr(layer, "bias", None)) for layer in layers]
        gen = torch.Generator(device).manual_seed(n + k)   # leaves the global RNG alone
        splits = split_candidates(n, k, num_sms(device))
        plan, swiglu_plan, norm_plan = [], [], []
        for m in m_values:
            pdl.enable(pdl.supported(device) and m <= pdl_rows)
            x = torch.randn(m, 2 * k if swiglu else k, device=device, generator=gen).to(dtype)
            x2, x = (x, silu_and_mul(x)) if swiglu else (None, x)   # the plain call's input
            torch_us = time_us(lambda: [torch.nn.functional.linear(x, w, b) for w, b in params]) / len(layers)
            timed = [(time_us(lambda: [skinny_gemm(x, w, b, s) for w, b in params]) / len(layers), s)
                     for s in splits]
            triton_us, split_k = min(timed)
            use = triton_us < (1 - MIN_GAIN) * torch_us
            plan.append((m, split_k if use else 0))
            report.append(dict(n=n, k=k, dtype=str(dtype).removeprefix("torch."), layers=len(layers),
                               swiglu=swiglu, m=m, pdl=pdl.enabled(), torch_us=torch_us, triton_us=triton_us,
                               split_k=split_k, skinny=use))
            if swiglu:
                report[-1].update(_time_swiglu_fusion(x2, params, splits, split_k if use else 0, time_us))
                swiglu_plan.append((m, report[-1]["swiglu_split_k"] if report[-1]["swiglu_fused"] else 0))
            if norm:
                report[-1].update(_time_norm_fusion(x, params, splits, split_k if use else 0, time_us))
                norm_plan.append((m, report[-1]["norm_split_k"] if report[-1]["norm_fused"] else 0))
        for layer in layers:
            layer.skinny = tuple(plan)
            if swiglu:
                layer.skinny_swiglu = tuple(swiglu_plan)
            if norm:
                layer.skinny_norm = tuple(norm_plan)
    return report


def _time_fusion(name, prologue, fused, params, splits, gemm_split, time_us) -> dict:
    """Microseconds per layer of `prologue()` (the kernel a fusion removes) + the GEMM path
    chosen for the plain call (the kernel at `gemm_split`, or F.linear for 0), against
    `fused(w, b, split)` at each split; keys prefixed `name`, and `<name>_fused` where the
    fused kernel wins by MIN_GAIN."""
    def unfused(w, b):
        h = prologue()
        return skinny_gemm(h, w, b, gemm_split) if gemm_split else torch.nn.functional.linear(h, w, b)
    pair_us = time_us(lambda: [unfused(w, b) for w, b in params]) / len(params)
    timed = [(time_us(lambda: [fused(w, b, s) for w, b in params]) / len(params), s) for s in splits]
    fused_us, split_k = min(timed)
    return {f"{name}_pair_us": pair_us, f"{name}_fused_us": fused_us, f"{name}_split_k": split_k,
            f"{name}_fused": fused_us < (1 - MIN_GAIN) * pair_us}


def _time_swiglu_fusion(x2, params, splits, gemm_split, time_us) -> dict:
    """silu_and_mul + the chosen path against the kernel with SiLU-and-mul in its prologue,
    on the [M, 2K] gate_up output x2."""
    return _time_fusion("swiglu", lambda: silu_and_mul(x2),
                        lambda w, b, s: skinny_gemm(x2, w, b, s, swiglu=True),
                        params, splits, gemm_split, time_us)


def _time_norm_fusion(x, params, splits, gemm_split, time_us) -> dict:
    """add_rmsnorm + the chosen path against skinny_gemm_rmsnorm, on x and a residual stream
    of x's shape."""
    res = torch.randn_like(x)
    norm_weight = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    return _time_fusion("norm", lambda: add_rmsnorm(x, norm_weight, 1e-6, res)[0],
                        lambda w, b, s: skinny_gemm_rmsnorm(x, res, norm_weight, 1e-6, w, b, s),
                        params, splits, gemm_split, time_us)
