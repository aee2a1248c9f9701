"""A whole decoder layer of a decode-only step in one persistent launch.

At batch 1 a decode layer is a chain of five dependent kernels (the qkv projection with its
input norm, attention with q/k-norm, RoPE and the K/V store, o_proj, gate_up with its norm,
down with SiLU-and-mul), each moving 1-13 MB: a few microseconds of bytes, but every kernel
also pays its launch, the ramp-up of its first loads and its tail, ~4-5 us a kernel even
with programmatic dependent launch (benchmarks/README.md, "where batch 1 goes"). Here one
program per SM runs all five stages, the same code the five kernels run (skinny_gemm.
skinny_program, paged_attention.decode_program) on the same work items, and the stages are
separated by a grid-wide barrier instead of a kernel boundary. A program asks L2 for the
weights (and first KV pages) of its items `ahead` stages before it runs them, so HBM streams
the layer's bytes while the chain waits on its barriers.

The barrier needs every program resident at once: the grid is one program per SM (one
fits, whatever the kernel's registers and shared memory), launched without programmatic
dependent launch, so it starts when the kernel before has completed and nothing of this
step runs beside it (the engine's one stream). The counters (`sync`: arrivals, exits) are
zero between launches: the last program out puts them back (graph replays need no memset).

The Triton interpreter runs programs one after another, so a barrier there would wait for
ever: on the interpreter (and with `stages=True`, for A/B runs on a GPU) each stage is its
own launch of the same kernel instead, the launch boundary standing in for the barrier.

The numbers are those of the five-kernel path with fused prologues (qkv_proj.
forward_rmsnorm, paged_decode_attention_qkv, o_proj, gate_up forward_rmsnorm, down with
swiglu): the same programs, up to the split-K shape, which may move a rounding.
"""
import importlib
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.launch import DECODE_BLOCK_N, DECODE_NUM_WARPS, MAX_SPLITS
from engine.kernels.skinny_gemm import (BLOCK_K, BLOCK_N, MAX_SPLIT_K, block_m, num_sms,
                                        prefetch_slice, skinny_program, workspace)

pa = importlib.import_module("engine.kernels.paged_attention")   # (the package's name
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"   # is a function)
MAX_ROWS = 64          # the skinny GEMM's row limit
NUM_WARPS = 4
NUM_STAGES = 3         # K steps in flight per program in the GEMM stages
AHEAD = 1              # stages past the current one whose bytes a program has asked L2 for
PROGRAMS_PER_SM = 2    # resident programs per SM (fewer where registers or shared memory allow fewer)


@triton.jit
def _grid_sync(sync_ptr, target):
    """Wait until `target` programs have arrived (the counter counts every barrier of the
    launch, so barrier i waits for (i + 1) x programs). Each program's stores come before
    its arrival (release), the loads after it see every arrived program's (acquire; the
    intermediate buffers are read once per launch, so no stale L1 line holds them)."""
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="release")
    count = tl.atomic_add(sync_ptr, 0, sem="acquire")
    while count < target:
        count = tl.atomic_add(sync_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _grid_exit(sync_ptr, programs):
    """The last program out (every other has passed every barrier) zeroes both counters."""
    tl.debug_barrier()
    done = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel")
    if done == programs - 1:
        tl.atomic_xchg(sync_ptr, 0)
        tl.atomic_xchg(sync_ptr + 1, 0)


@triton.jit
def _prefetch_gemm(w_ptr, N, K, tiles, splits, k_per_split, pid, programs,
                   BLOCK_N: tl.constexpr, ELEM_BYTES: tl.constexpr):
    """L2 prefetch of the weight slices of this program's items of a GEMM stage."""
    for item in range(pid, tiles * splits, programs):
        offs_n = (item % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_start = (item // tiles) * k_per_split
        prefetch_slice(w_ptr, offs_n, N, k_start, tl.minimum(k_start + k_per_split, K), K,
                       ELEM_BYTES, BLOCK_N)


@triton.jit
def _prefetch_attention(k_cache_ptr, v_cache_ptr, block_tables_ptr, work_ptr, items, num_kv,
                        pid, programs, stride_cb, stride_bt, BLOCK_SIZE: tl.constexpr,
                        PART_ELEMS: tl.constexpr, PART_BYTES: tl.constexpr, TILE: tl.constexpr,
                        PAGES: tl.constexpr):
    """L2 prefetch of the first tile's KV pages of this program's attention items."""
    for item in range(pid, items * num_kv, programs):
        slot = item // num_kv
        b = tl.load(work_ptr + 4 * slot)
        if b >= 0:
            pa._prefetch_pages(k_cache_ptr, v_cache_ptr, block_tables_ptr + b * stride_bt,
                               tl.load(work_ptr + 4 * slot + 1), tl.load(work_ptr + 4 * slot + 2),
                               item % num_kv, stride_cb, BLOCK_SIZE, PART_ELEMS, PART_BYTES, TILE,
                               PAGES, True)


@triton.jit
def _prefetch(stage: tl.constexpr, pid, programs,
              qkv_w, o_w, gu_w, down_w, H, NQKV, QD, I,
              T1, S1, KS1, T3, S3, KS3, T4, S4, KS4, T5, S5, KS5,
              k_cache_ptr, v_cache_ptr, block_tables_ptr, work_ptr, A_ITEMS, NUM_KV, stride_cb,
              stride_bt, BLOCK_N: tl.constexpr, ELEM_BYTES: tl.constexpr,
              BLOCK_SIZE: tl.constexpr, PART_ELEMS: tl.constexpr, PART_BYTES: tl.constexpr,
              A_TILE: tl.constexpr, PAGES: tl.constexpr):
    if stage == 1:
        _prefetch_gemm(qkv_w, NQKV, H, T1, S1, KS1, pid, programs, BLOCK_N, ELEM_BYTES)
    if stage == 2:
        _prefetch_attention(k_cache_ptr, v_cache_ptr, block_tables_ptr, work_ptr, A_ITEMS, NUM_KV,
                            pid, programs, stride_cb, stride_bt, BLOCK_SIZE, PART_ELEMS,
                            PART_BYTES, A_TILE, PAGES)
    if stage == 3:
        _prefetch_gemm(o_w, H, QD, T3, S3, KS3, pid, programs, BLOCK_N, ELEM_BYTES)
    if stage == 4:
        _prefetch_gemm(gu_w, 2 * I, H, T4, S4, KS4, pid, programs, BLOCK_N, ELEM_BYTES)
    if stage == 5:
        _prefetch_gemm(down_w, H, I, T5, S5, KS5, pid, programs, BLOCK_N, ELEM_BYTES)


@triton.jit(do_not_specialize=["M", "A_ITEMS"],
            do_not_specialize_on_alignment=["block_tables_ptr", "context_lens_ptr", "qsl_ptr",
                                            "work_ptr", "index_ptr", "pos_ptr", "slot_ptr"])
def _decode_layer_kernel(
    x_ptr, res_ptr, res1_ptr, qkv_ptr, attn_ptr, o_ptr, res2_ptr, gu_ptr, out_ptr,
    in_norm_ptr, post_norm_ptr, eps,
    qkv_w, qkv_b, o_w, o_b, gu_w, down_w,
    partial_ptr, arrivals_ptr, sync_ptr,
    k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, qsl_ptr, work_ptr, index_ptr,
    apart_ptr, alse_ptr, tickets_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr,
    qk_scale, qk_eps,
    M, H, NQKV, QD, I,
    stride_cb, stride_cs, stride_ch, stride_bt, stride_pp, stride_ph, stride_lp, stride_cos,
    T1, S1, KS1, T3, S3, KS3, T4, S4, KS4, T5, S5, KS5, A_ITEMS, NUM_KV,
    HAS_RES: tl.constexpr, QKV_BIAS: tl.constexpr, O_BIAS: tl.constexpr, IEEE: tl.constexpr,
    SPLIT1: tl.constexpr, SPLIT3: tl.constexpr, SPLIT4: tl.constexpr, SPLIT5: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ELEM_BYTES: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, A_BLOCK_N: tl.constexpr,
    TILE_IN_PAGE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    MERGE_G: tl.constexpr, MERGE_S: tl.constexpr, QK_NORM: tl.constexpr,
    PART_ELEMS: tl.constexpr, PART_BYTES: tl.constexpr, PAGES: tl.constexpr,
    STAGE: tl.constexpr, PREFETCH: tl.constexpr, AHEAD: tl.constexpr,
):
    """STAGE 0: all five stages with grid barriers between them (one launch a layer); STAGE
    s in 1..5: that stage alone (the interpreter's launches). Buffers are [M, width]
    contiguous: x, res, res1, o, res2, out [M, H]; qkv [M, NQKV]; attn [M, QD]; gu [M, 2I]."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    if PREFETCH:   # the bytes of the first stages (a stage launch: its own)
        for s in tl.static_range(1, 2 + AHEAD):
            if STAGE == 0 or s == 1:
                _prefetch(s if STAGE == 0 else STAGE, pid, P, qkv_w, o_w, gu_w, down_w, H, NQKV,
                          QD, I, T1, S1, KS1, T3, S3, KS3, T4, S4, KS4, T5, S5, KS5,
                          k_cache_ptr, v_cache_ptr, block_tables_ptr, work_ptr, A_ITEMS, NUM_KV,
                          stride_cb, stride_bt, BLOCK_N, ELEM_BYTES, BLOCK_SIZE, PART_ELEMS,
                          PART_BYTES, A_BLOCK_N, PAGES)
    # 1: qkv = RMSNorm(x + res) @ Wqkv^T (+ b); res1 = x + res
    if STAGE == 0 or STAGE == 1:
        for item in range(pid, T1 * S1, P):
            skinny_program(item % T1, item // T1, T1, S1, x_ptr, qkv_w, qkv_b, qkv_ptr,
                           partial_ptr, arrivals_ptr, res_ptr, in_norm_ptr, res1_ptr, eps,
                           M, NQKV, H, H, H, NQKV, H, H, KS1, QKV_BIAS, SPLIT1, IEEE, False, True,
                           HAS_RES, BLOCK_M, BLOCK_N, BLOCK_K, False, False, ELEM_BYTES)
    if STAGE == 0:
        _stage_end(1, sync_ptr, pid, P, qkv_w, o_w, gu_w, down_w, H, NQKV, QD, I,
                   T1, S1, KS1, T3, S3, KS3, T4, S4, KS4, T5, S5, KS5,
                   k_cache_ptr, v_cache_ptr, block_tables_ptr, work_ptr, A_ITEMS, NUM_KV,
                   stride_cb, stride_bt, BLOCK_N, ELEM_BYTES, BLOCK_SIZE, PART_ELEMS,
                   PART_BYTES, A_BLOCK_N, PAGES, PREFETCH, AHEAD)
    # 2: attention (q/k-norm, RoPE, K/V store, split-KV with the in-launch merge) -> attn
    if STAGE == 0 or STAGE == 2:
        for item in range(pid, A_ITEMS * NUM_KV, P):
            pa.decode_program(item // NUM_KV, item % NUM_KV, 0, NUM_KV,
                              qkv_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                              context_lens_ptr, qsl_ptr, work_ptr, index_ptr, attn_ptr, apart_ptr,
                              alse_ptr, tickets_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
                              slot_ptr, qk_scale, qk_eps, NQKV, HEAD_DIM, stride_cb, stride_cs,
                              stride_ch, stride_bt, QD, HEAD_DIM, stride_pp, stride_ph, stride_lp,
                              stride_cos, 1, GROUP, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE,
                              A_BLOCK_N, TILE_IN_PAGE, True, True, PRECISION, UPCAST, False,
                              False, PART_ELEMS, PART_BYTES, PAGES, True, MERGE_G, MERGE_S,
                              True, QK_NORM)
    if STAGE == 0:
        _stage_end(2, sync_ptr, pid, P, qkv_w, o_w, gu_w, down_w, H, NQKV, QD, I,
                   T1, S1, KS1, T3, S3, KS3, T4, S4, KS4, T5, S5, KS5,
                   k_cache_ptr, v_cache_ptr, block_tables_ptr, work_ptr, A_ITEMS, NUM_KV,
                   stride_cb, stride_bt, BLOCK_N, ELEM_BYTES, BLOCK_SIZE, PART_ELEMS,
                   PART_BYTES, A_BLOCK_N, PAGES, PREFETCH, AHEAD)
    # 3: o = attn @ Wo^T (+ b)
    if STAGE == 0 or STAGE == 3:
        for item in range(pid, T3 * S3, P):
            skinny_program(item % T3, item // T3, T3, S3, attn_ptr, o_w, o_b, o_ptr,
                           partial_ptr, arrivals_ptr, attn_ptr, in_norm_ptr, attn_ptr, eps,
                           M, H, QD, QD, QD, H, QD, QD, KS3, O_BIAS, SPLIT3, IEEE, False, False,
                           False, BLOCK_M, BLOCK_N, BLOCK_K, False, False, ELEM_BYTES)
    if STAGE == 0:
        _stage_end(3, sync_ptr, pid, P, qkv_w, o_w, gu_w, down_w, H, NQKV, QD, I,
                   T1, S1, KS1, T3, S3, KS3, T4, S4, KS4, T5, S5, KS5,
                   k_cache_ptr, v_cache_ptr, block_tables_ptr, work_ptr, A_ITEMS, NUM_KV,
                   stride_cb, stride_bt, BLOCK_N, ELEM_BYTES, BLOCK_SIZE, PART_ELEMS,
                   PART_BYTES, A_BLOCK_N, PAGES, PREFETCH, AHEAD)
    # 4: gu = RMSNorm(o + res1) @ Wgu^T; res2 = o + res1
    if STAGE == 0 or STAGE == 4:
        for item in range(pid, T4 * S4, P):
            skinny_program(item % T4, item // T4, T4, S4, o_ptr, gu_w, gu_w, gu_ptr,
                           partial_ptr, arrivals_ptr, res1_ptr, post_norm_ptr, res2_ptr, eps,
                           M, 2 * I, H, H, H, 2 * I, H, H, KS4, False, SPLIT4, IEEE, False, True,
                           True, BLOCK_M, BLOCK_N, BLOCK_K, False, False, ELEM_BYTES)
    if STAGE == 0:
        _stage_end(4, sync_ptr, pid, P, qkv_w, o_w, gu_w, down_w, H, NQKV, QD, I,
                   T1, S1, KS1, T3, S3, KS3, T4, S4, KS4, T5, S5, KS5,
                   k_cache_ptr, v_cache_ptr, block_tables_ptr, work_ptr, A_ITEMS, NUM_KV,
                   stride_cb, stride_bt, BLOCK_N, ELEM_BYTES, BLOCK_SIZE, PART_ELEMS,
                   PART_BYTES, A_BLOCK_N, PAGES, PREFETCH, AHEAD)
    # 5: out = (silu(gate) * up) @ Wdown^T
    if STAGE == 0 or STAGE == 5:
        for item in range(pid, T5 * S5, P):
            skinny_program(item % T5, item // T5, T5, S5, gu_ptr, down_w, down_w, out_ptr,
                           partial_ptr, arrivals_ptr, gu_ptr, post_norm_ptr, gu_ptr, eps,
                           M, H, I, 2 * I, I, H, 2 * I, 2 * I, KS5, False, SPLIT5, IEEE, True,
                           False, False, BLOCK_M, BLOCK_N, BLOCK_K, False, False, ELEM_BYTES)
    if STAGE == 0:
        _grid_exit(sync_ptr, P)


@triton.jit
def _stage_end(stage: tl.constexpr, sync_ptr, pid, P, qkv_w, o_w, gu_w, down_w, H, NQKV, QD, I,
               T1, S1, KS1, T3, S3, KS3, T4, S4, KS4, T5, S5, KS5,
               k_cache_ptr, v_cache_ptr, block_tables_ptr, work_ptr, A_ITEMS, NUM_KV,
               stride_cb, stride_bt, BLOCK_N: tl.constexpr, ELEM_BYTES: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, PART_ELEMS: tl.constexpr, PART_BYTES: tl.constexpr,
               A_TILE: tl.constexpr, PAGES: tl.constexpr, PREFETCH: tl.constexpr,
               AHEAD: tl.constexpr):
    """After stage `stage`: ask L2 for stage `stage` + 1 + AHEAD (its bytes arrive while this
    program waits), then the grid barrier."""
    if PREFETCH:
        if stage + 1 + AHEAD <= 5:
            _prefetch(stage + 1 + AHEAD, pid, P, qkv_w, o_w, gu_w, down_w, H, NQKV, QD, I,
                      T1, S1, KS1, T3, S3, KS3, T4, S4, KS4, T5, S5, KS5,
                      k_cache_ptr, v_cache_ptr, block_tables_ptr, work_ptr, A_ITEMS, NUM_KV,
                      stride_cb, stride_bt, BLOCK_N, ELEM_BYTES, BLOCK_SIZE, PART_ELEMS,
                      PART_BYTES, A_TILE, PAGES)
    _grid_sync(sync_ptr, P * stage)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors as the fused launch reads them (nn.Linear layout [out, in]).
    qkv [(H + 2 Hkv) D, hidden], o [H D, hidden]... see `decode_layer`."""
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qk_eps: float
    num_heads: int
    scale: float


def split_items(n: int, k: int, programs: int) -> tuple[int, int, int]:
    """(tiles, splits, K per split) of a GEMM stage: N in BLOCK_N tiles, K split so the items
    come as close to one per program as whole BLOCK_K pieces allow (at most MAX_SPLIT_K)."""
    tiles = triton.cdiv(n, BLOCK_N)
    splits = max(1, min(programs // tiles, triton.cdiv(k, BLOCK_K), MAX_SPLIT_K))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), BLOCK_K) * BLOCK_K
    return tiles, triton.cdiv(k, k_per_split), k_per_split


def stage_items(w: LayerWeights, head_dim: int, programs: int) -> list[tuple[int, int, int]]:
    """(tiles, splits, K per split) of the four GEMM stages: qkv, o, gate_up, down."""
    h, inter = w.qkv.shape[1], w.down.shape[1]
    return [split_items(n, k, programs) for n, k in ((w.qkv.shape[0], h), (h, w.num_heads * head_dim),
                                                     (2 * inter, h), (h, inter))]


def _workspace(device, stages, bm):
    return workspace(device, max(t * s for t, s, _ in stages) * BLOCK_N * bm, max(t for t, _, _ in stages))


def reserve(device: torch.device, w: LayerWeights, head_dim: int, rows: int) -> None:
    """Make the buffers a launch of up to `rows` rows of this layer's shape needs (the split-K
    workspace, the barrier counters) before CUDA-graph capture: made inside one, their zeros
    would be written at the first replay only."""
    _workspace(device, stage_items(w, head_dim, num_sms(device)), block_m(rows))
    _sync_counters(device)


_SYNC: dict[torch.device, torch.Tensor] = {}


def _sync_counters(device: torch.device) -> torch.Tensor:
    """The barrier's two int32 counters, zero between launches; made outside a capture (the
    zeros of a buffer made inside one would be written only at the first replay)."""
    sync = _SYNC.get(device)
    if sync is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode_layer: call it once before CUDA-graph capture")
        sync = _SYNC[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return sync


def drop_buffers(device: torch.device) -> None:
    """Forget the device's barrier counters (engine.kernels.buffers)."""
    _SYNC.pop(device, None)


def supported(w: LayerWeights, hidden: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """Why this layer cannot run as one launch on these inputs, or None."""
    if hidden.dim() != 2 or not 1 <= hidden.shape[0] <= MAX_ROWS:
        return f"takes 1..{MAX_ROWS} rows, got {tuple(hidden.shape)}"
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {hidden.dtype}"
    tensors = [w.in_norm, w.post_norm, w.qkv, w.o, w.gate_up, w.down]
    if any(t.dtype != hidden.dtype or not t.is_contiguous() for t in tensors):
        return "weights must be contiguous in the activation dtype"
    if hidden.device.type == "cuda" and any(t.data_ptr() % 16 or t.shape[-1] * t.element_size() % 16
                                            for t in (w.qkv, w.o, w.gate_up, w.down)):
        return "weight rows must be 16-byte aligned (L2 prefetch)"
    return None


def decode_layer(w: LayerWeights, hidden: torch.Tensor, residual: torch.Tensor | None,
                 positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                 slot_mapping: torch.Tensor, work: tuple[torch.Tensor, torch.Tensor],
                 stages: bool | None = None, ahead: int = AHEAD, prefetch: bool = True,
                 programs_per_sm: int = PROGRAMS_PER_SM) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer of a decode-only step (every row one decode token, `work` the
    runner's split-KV plan of them: engine.kernels.launch.plan_decode_work) -> (the MLP's
    output, the residual stream after attention), as DecoderLayer.forward returns them:
    h1 = hidden + residual (hidden alone when residual is None); qkv = RMSNorm(h1) Wqkv^T;
    attention with q/k-norm and RoPE at `positions`, this token's K/V stored at
    slot_mapping; h2 = attn Wo^T + h1; out = silu(gate) * up of RMSNorm(h2) Wgu^T, times
    Wdown^T. stages: one launch per stage (default on the interpreter, where the barrier
    cannot run); prefetch (GPU only): ask L2 for each stage's bytes `ahead` (0-4) stages
    before it runs. programs_per_sm: the grid, per SM, where that many fit on one at once
    (the barrier needs every program resident: fewer are launched where fewer fit).
    CUDA-graph safe after one call on the device outside a capture (counters, workspace)."""
    why = supported(w, hidden, k_cache)
    if why:
        raise ValueError(f"decode_layer: {why}")
    stages = _INTERPRETED if stages is None else stages
    if not 0 <= ahead <= 4:
        raise ValueError(f"decode_layer: ahead must be in 0..4, got {ahead}")
    dev, dtype = hidden.device, hidden.dtype
    m, h = hidden.shape
    num_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    nqkv, qd, inter = w.qkv.shape[0], w.num_heads * head_dim, w.down.shape[1]
    group = w.num_heads // num_kv
    programs = num_sms(dev) * programs_per_sm
    g1, g3, g4, g5 = stage_items(w, head_dim, programs)
    bm = block_m(m)
    partial, arrivals = _workspace(dev, (g1, g3, g4, g5), bm)
    sync = _sync_counters(dev)
    items, index = work
    tickets = pa._tickets(dev, context_lens.shape[0] * num_kv)
    x = hidden.contiguous()
    res = residual.contiguous() if residual is not None else x
    res1 = torch.empty_like(x) if residual is not None else x
    qkv = torch.empty((m, nqkv), dtype=dtype, device=dev)
    attn = torch.empty((m, qd), dtype=dtype, device=dev)
    o = torch.empty((m, h), dtype=dtype, device=dev)
    res2 = torch.empty((m, h), dtype=dtype, device=dev)
    gu = torch.empty((m, 2 * inter), dtype=dtype, device=dev)
    out = torch.empty((m, h), dtype=dtype, device=dev)
    apart = torch.empty(items.shape[0], w.num_heads, head_dim, dtype=torch.float32, device=dev)
    alse = torch.empty(items.shape[0], w.num_heads, dtype=torch.float32, device=dev)
    precision, upcast = pa._dot_flags(dtype)
    block_size = k_cache.shape[1]
    prefetch = (prefetch and dev.type == "cuda" and not _INTERPRETED
                and pa._pages_contiguous(k_cache, v_cache))
    merge_g = triton.next_power_of_2(group)
    hd_pad = triton.next_power_of_2(head_dim)
    args = (x, res, res1, qkv, attn, o, res2, gu, out, w.in_norm, w.post_norm, w.eps,
            w.qkv, w.qkv_bias if w.qkv_bias is not None else w.qkv, w.o,
            w.o_bias if w.o_bias is not None else w.o, w.gate_up, w.down, partial, arrivals, sync,
            k_cache, v_cache, block_tables, context_lens, query_start_loc, items, index, apart, alse,
            tickets, positions, cos, sin, w.q_norm if w.q_norm is not None else cos,
            w.k_norm if w.k_norm is not None else cos, slot_mapping,
            w.scale * math.log2(math.e), w.qk_eps, m, h, nqkv, qd, inter,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            apart.stride(0), apart.stride(1), alse.stride(0), cos.stride(0),
            *g1, *g3, *g4, *g5, items.shape[0], num_kv)
    consts = dict(
        HAS_RES=residual is not None, QKV_BIAS=w.qkv_bias is not None, O_BIAS=w.o_bias is not None,
        IEEE=dtype == torch.float32 or _INTERPRETED, SPLIT1=g1[1] > 1, SPLIT3=g3[1] > 1,
        SPLIT4=g4[1] > 1, SPLIT5=g5[1] > 1, BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        ELEM_BYTES=hidden.element_size(), GROUP=group, GROUP_PAD=max(16, merge_g),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=hd_pad, BLOCK_SIZE=block_size, A_BLOCK_N=DECODE_BLOCK_N,
        TILE_IN_PAGE=block_size % DECODE_BLOCK_N == 0, PRECISION=precision, UPCAST=upcast,
        MERGE_G=merge_g, MERGE_S=max(1, min(triton.next_power_of_2(MAX_SPLITS), 4096 // (merge_g * hd_pad))),
        QK_NORM=w.q_norm is not None,
        PART_ELEMS=block_size * head_dim if prefetch else 0,
        PART_BYTES=block_size * head_dim * k_cache.element_size() if prefetch else 0,
        PAGES=triton.next_power_of_2(triton.cdiv(DECODE_BLOCK_N, block_size) + 1),
        PREFETCH=prefetch, AHEAD=ahead,
        num_warps=max(NUM_WARPS, DECODE_NUM_WARPS), num_stages=NUM_STAGES)
    if not stages:
        fit = _resident(dev, args, consts)
        if fit < programs_per_sm:   # (the stages' items were cut for the grid: cut again)
            return decode_layer(w, hidden, residual, positions, cos, sin, k_cache, v_cache,
                                block_tables, context_lens, query_start_loc, slot_mapping, work,
                                stages, ahead, prefetch, fit)
    for stage in (range(1, 6) if stages else (0,)):
        _decode_layer_kernel[(programs,)](*args, STAGE=stage, **consts)
    return out, res2


_FIT: dict[tuple, int] = {}


def _resident(device, args, consts) -> int:
    """Programs of the one-launch kernel that fit on one SM at once (its registers, shared
    memory and warps against the SM's), from the compiled kernel; at least 1 (a kernel that
    does not fit at all fails to launch)."""
    key = (device, tuple(sorted((k, str(v)) for k, v in consts.items())))
    if key not in _FIT:
        kernel = _decode_layer_kernel.warmup(*args, STAGE=0, grid=(1,), **consts)
        kernel._init_handles()
        props = torch.cuda.get_device_properties(device)
        warps = consts["num_warps"]
        regs = -(-kernel.n_regs * 32 // 256) * 256 * warps          # allocated per warp in 256s
        smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
        _FIT[key] = max(1, min(getattr(props, "regs_per_multiprocessor", 65536) // max(regs, 1),
                               smem // (kernel.metadata.shared + 1024),   # + the CTA's reserved 1 KB
                               getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)))
    return _FIT[key]
