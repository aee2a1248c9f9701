"""W4A16: y = x W^T (+ bias) with W stored as 4-bit GPTQ or AWQ tensors (engine.layers.quant
documents the layouts); x and y in the activation dtype, accumulation in fp32.

At load time (engine.layers.quant.repack_layers, before the choice) every layer is repacked
once into one kernel layout, `repack`: words [K, N/8] packed along N in AWQ's order (a
thread's 32-bit word is 8 output columns of one input row, all multiplied by the same x),
zeros likewise, act-order rows sorted by group (x read through a permutation, so act-order
weights run the one-group-per-step paths). Every kernel below reads both the checkpoint
layouts and the repacked one (W4.packing), so the engine keeps a single copy. Nine ways to
run a layer, chosen per (layer shape, row count M) by measurement at load time
(`choose_w4a16`, which also checks every candidate's product against the torch reference):

  stream   (M = 1, repacked) `_w4a16_stream_kernel`: built for HBM bandwidth: each step a
           program loads a [STEP, BLOCK_N / 8] word tile with one 16-byte load per thread
           and row, so every thread has STEP / (rows its program covers) loads in flight
           before it uses one; a weight costs one AND-OR (the float base + q, as fma) and one
           FMA into the thread's partial sum of its column; K is reduced inside the thread,
           across the program's threads once at the end, and across splits by the last
           split to arrive, which issues all its partial loads at once (deterministic).
           Split so that a program's K range is one group (or half): zero and scale are then
           applied once per column after the cross-thread sum, not per thread.
  swap     (M <= 64, repacked, one group per K step, bf16) `_w4a16_swap_kernel`: the mma
           kernel's tile with its group's scale folded in (bf16x2 subtract and multiply),
           the weights the MMA's wide operand taken from registers (wgmma's A operand on
           sm_90: M only pads the narrow one), x^T staged through shared memory; the MMA
           accumulates in place, so one stays in flight while the next tile is dequantized.
  slice    (M <= 64, repacked, one group per K step, bf16) `_w4a16_slice_kernel`: nibble j
           of every word is column 8c + AWQ_ORDER[j], so the words tile is eight column
           slices of W^T, each made in registers from the words (rows paired, then one shift
           and one AND-OR per two weights: (q | 0x4300) as bf16 is 128 + q): eight mma.v2
           products per K step share the x tile, the words go from the pipeline's shared
           memory into registers in a layout whose reshapes land on the MMA operand's (no
           shared-memory round trip of a bf16 tile, no barrier for it; ~3.3 SASS instructions
           per weight against the swap kernel's 6.8).
           Zero and scale per slice and group on the fp32 product (the sum-of-x trick).
           Programs of 16 or 32 rows (Launch.block_m), two per tile above that.
  fma      (M = 1, repacked) `_w4a16_fma_kernel`: each thread streams whole words and keeps
           one fp32 FMA chain per output column, K reduced inside the thread; a weight costs
           one AND-OR (the nibble into the mantissa of the float 128 or 2048) plus a shift
           shared by two, and one FMA. Split-K wide (about 16 one-warp programs per SM).
  mma      (M <= 64, repacked, one group per K step, bf16) `_w4a16_mma_kernel`: the W^T
           tile made in registers from each thread's own words (one AND-OR per bf16 pair of
           adjacent columns, one bf16x2 subtraction of the zero: q - z exact), handed to
           tl.dot (mma.v2 at BLOCK_M 16, wgmma at 64), the group's scale applied in fp32 to
           each step's product.

  skinny   (M <= 64, the decode regime) built for HBM bandwidth like
           engine.kernels.skinny_gemm: each program streams [BLOCK_N, BLOCK_K] tiles of 4-bit
           weights (BLOCK_N * BLOCK_K / 2 bytes per K step, several steps in flight), unpacks
           them in registers and runs the "swapped" dot acc[BLOCK_N, BLOCK_M] += W @ x^T, so
           the weight tile is the wide MMA operand and M only pads the narrow one. K is split
           over a second grid axis, reduced inside the same launch by the split that arrives
           last at the tile's counter (skinny_gemm's workspace: no memset, no reduce, no cast
           kernel). M and the split's K range are runtime arguments: one compiled variant per
           (tile, BLOCK_M 16 or 64, split or not), whatever the graph size.
           Dequantization per weight is a shift, a mask and an OR: with one group per K step
           (BLOCK_K divides group_size), (q | MAGIC) read as bf16 (fp16) is exactly 128 + q
           (1024 + q), and zero and scale come out of the dot:
               sum_k (q - z) s x = s * (dot(128 + q, x) - (128 + z) * sum_k x)
           Act-order (g_idx) and group sizes that no BLOCK_K >= 16 divides take the per-row
           path: each weight is dequantized with its row's group before the dot (slower).
  gemv     (M <= 2) the same kernel with K-major tiles (the words as stored: GPTQ
           [K/8, N], AWQ [K, N/8]) reduced along K inside each thread by fp32 multiply-adds:
           (q << 16 | 0x43000000) read as fp32 is 128 + q, so a weight costs a shift, a
           mask-and-OR and one FMA per row, with no padded MMA, no shared-memory round trip
           of the dequantized tile and no cross-thread reduction; at batch 1 the 4-bit read
           leaves the ALUs little slack, which is why both forms are measured.
  tiled    (prefill-sized M) [BLOCK_M x BLOCK_N] output tiles over the whole K, each K step
           dequantizing a [BLOCK_K, BLOCK_N] weight tile for the x tile.
  dequant  the layer's W^T [K, N] dequantized into one shared scratch buffer (allocated by
           `choose_w4a16` for the largest layer, never freed), then torch's matmul (cuBLAS).
           At M = 2,048 the dequantization (0.5 byte read and 2 written per weight) is a few
           per cent of the matmul, so prefill runs at the dense model's speed.

Capture-safe: no host synchronization; the allocations are y and, on first use at a size,
the shared workspace / scratch (choose_w4a16 sizes both before capture). Calls on a device
must be stream-ordered (they share the workspace and the scratch), as the engine's are.

The Triton interpreter (TRITON_INTERPRET=1, the CPU tests) multiplies the raw bits of bf16
tl.dot operands: there (and for fp32 activations) dots run in fp32 on upcast operands.
"""
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.skinny_gemm import graph_time_us, num_sms, store_tile, workspace

MAX_M = 64                 # rows the skinny kernel takes (the decode regime)
GEMV_MAX_M = 2             # rows its multiply-add (GEMV) variant takes
FMA_MAX_M = 1              # rows the multiply-add kernel on the repacked layout takes
PROGRAMS_PER_SM = 2        # split K until about this many programs per SM ...
MIN_K_PER_SPLIT = 512      # ... keeping at least this much K per program
MAX_SPLIT_K = 16
PREFILL_M = (128, 256, 512, 1024, 2048)   # row counts choose_w4a16 measures above MAX_M
MIN_GAIN = 0.02            # a candidate must beat the default by 2% to replace it
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAGIC = {torch.bfloat16: (0x4300, 128), torch.float16: (0x6400, 1024)}   # bits, value


class Launch(NamedTuple):
    """How one call runs: kind "stream" | "fma" | "slice" | "swap" | "mma" | "skinny" | "gemv" |
    "tiled" | "dequant"; for the kernels the tile (block_n; block_k: K per step, for skinny
    before the group-size cap, for stream the most rows per step), warps, pipeline stages;
    the K split (0: the launch rule's); for tiled and slice the rows per program."""
    kind: str
    block_n: int = 0
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 0
    block_m: int = 64
    chain: bool = False   # stream: the 4 row blocks of a step in one FMA chain (no adds)
    # stream / slice / swap / mma while the engine launches with programmatic dependent
    # launch (engine.kernels.pdl): PDL_PREFETCH its programs bulk-prefetch their weight
    # slice into L2 before they wait, PDL_WAIT they only wait, PDL_OFF launched without PDL
    pdl: int = 2


PDL_OFF, PDL_WAIT, PDL_PREFETCH = 0, 1, 2   # Launch.pdl


# Tiles per BLOCK_M (x rows padded for the MMA), from sm_90 compiles (ptxas registers, no
# spills: 4-warp tiles spill at BLOCK_M 64) pending GPU timings (bench_quant.py --sweep)
SKINNY_TILES = {16: (Launch("skinny", 128, 128, 4, 4),   # 8 KB of 4-bit weights per K step
                     Launch("skinny", 256, 64, 8, 4)),   # 8 KB, twice the output columns
                64: (Launch("skinny", 128, 128, 8, 4),
                     Launch("skinny", 128, 64, 8, 6))}   # 4 KB steps, deeper pipeline
GEMV = Launch("gemv", 128, 128, 8, 4)    # 8 warps: AWQ at 4 spills near 255 registers
# The GEMV tiles choose_w4a16 also times: the H200 sweep (bench_quant.py --sweep, session 4)
# found 256-column tiles 1.5-1.9x faster at one row than the launches chosen then, and GEMV
# at 8 warps / 4 stages out of shared memory there (triton 3.6); what does not fit is skipped.
GEMV_TILES = (GEMV, Launch("gemv", 256, 128, 4, 4), Launch("gemv", 256, 128, 8, 4),
              Launch("gemv", 256, 64, 4, 4), Launch("gemv", 128, 128, 4, 4))
TILED = Launch("tiled", 128, 64, 8, 3)               # BLOCK_M 64
# The multiply-add kernel on repacked weights (M = 1): BLOCK_N / 8 words per program, 1-4
# words per thread per row (BLOCK_N / (256 x warps): 4-16 byte loads); sm_90 compiles (ptxas,
# no spills): 64 / 72 / 127 / 56 registers, 4 / 8 / 16 / 16 KB of shared memory (3 stages).
FMA_TILES = (Launch("fma", 256, 16, 1, 3), Launch("fma", 512, 16, 1, 3),
             Launch("fma", 1024, 16, 1, 3), Launch("fma", 1024, 16, 4, 3))
FMA_WARPS_PER_SM = 16      # the fma split rule's target (warps of 56-127 registers)
MAX_FMA_SPLIT_K = 64
# The streaming kernel on repacked weights (M = 1): (BLOCK_N, STEP rows per K step, warps,
# pipeline stages); a program's threads cover 128 x warps / (BLOCK_N / 8) rows with one
# 16-byte load each, so a thread issues STEP / that loads per step before using one (4 or
# 8). sm_90 compiles (ptxas, no spills), one group per program: 96 / 84 / 128 / 82 / 84 / 80
# registers, the 7th pipelined through 16 KB of shared memory (16-byte async copies); the
# last two take a whole 128-row group in one step (8 / 16 loads per thread in flight: one
# HBM round trip per program where it is one group, for layers too small to fill the GPU
# with steps), 165 / 239 registers (4-warp tiles of 8+ loads per thread spill).
STREAM_TILES = (Launch("stream", 256, 64, 4, 1), Launch("stream", 512, 32, 4, 1),
                Launch("stream", 512, 64, 4, 1), Launch("stream", 256, 32, 2, 1),
                Launch("stream", 256, 16, 1, 1), Launch("stream", 1024, 16, 4, 1),
                Launch("stream", 512, 32, 4, 3), Launch("stream", 512, 128, 8, 1),
                Launch("stream", 1024, 128, 8, 1))
STREAM_WARPS_PER_SM = 16     # the stream split rule's target
MAX_STREAM_SPLIT_K = 128
# The swapped mma kernel (weights the wide operand, from registers; M <= 64), per BLOCK_M;
# sm_90 compiles (ptxas, no spills): wgmma with the A operand in registers, one MMA in flight
# across steps; 16: 143 / 96 / 168 / 80 registers, 45 / 43 / 50 / 33 KB of shared memory;
# 64: 128 / 168 / 172 / 127 registers, 73 / 50 / 50 / 82 KB.
SWAP_TILES = {16: (Launch("swap", 128, 128, 4, 4), Launch("swap", 256, 64, 8, 4),
                   Launch("swap", 128, 64, 4, 4), Launch("swap", 64, 128, 4, 4)),
              64: (Launch("swap", 128, 128, 8, 3), Launch("swap", 128, 64, 4, 4),
                   Launch("swap", 256, 64, 8, 3), Launch("swap", 64, 128, 4, 4))}
# The mma kernel on repacked weights (M <= 64), per BLOCK_M; sm_90 compiles (ptxas, no
# spills): 16: mma.v2, 167 / 126 / 114 registers, 68 / 62 / 40 KB of shared memory; 64:
# wgmma, 124 / 208 registers, 97 / 72 KB. SASS per K step: 3.6-4.7 instructions per weight
# at BLOCK_M 16 (the skinny kernel on the checkpoint layout: 10.4), 5.7-6.0 at 64.
# The nibble-sliced kernel (M <= 64; block_m: rows per program, 16 or 32, more rows in more
# programs: slice_fits); sm_90 compiles (ptxas, no spills; mma.v2, the words loaded from the
# pipeline's shared memory and dequantized in registers, no tile stored back): 16 rows: 161 /
# 148 / 150 / 161 registers, 41 / 75 / 31 / 38 KB of shared memory, 3.3 / 3.5 / 4.3 / 4.3
# SASS instructions per weight in the K loop (the swap kernel: 6.8, with 10 barriers per
# step); 32 rows: 246 / 251 registers, 83 / 63 KB, 4.1 / 5.2 (with act-order's x permutation
# they spill 120 / 16 bytes; 4-warp and 256-column tiles spill at 32 rows: the compiler puts
# the warps along M).
SLICE_TILES = tuple(Launch("slice", bn, bk, warps, stages, block_m=bm) for bm, bn, bk, warps, stages in (
    (16, 256, 128, 4, 3), (16, 512, 128, 8, 3), (16, 256, 64, 4, 4), (16, 512, 64, 8, 3),
    (32, 512, 128, 8, 3), (32, 512, 64, 8, 4)))
MMA_TILES = {16: (Launch("mma", 128, 128, 4, 4), Launch("mma", 256, 64, 8, 4),
                  Launch("mma", 64, 128, 4, 4)),
             64: (Launch("mma", 128, 128, 8, 3), Launch("mma", 256, 64, 8, 3))}


# ---- kernels -------------------------------------------------------------------------------

@triton.jit
def _nibble_shift(c, AWQ: tl.constexpr):
    """Bit position of column c % 8 in an N-packed word: AWQ's interleaved order (AWQ 1, and
    the repacked layout: AWQ 2), or natural (GPTQ's qzeros: AWQ 0)."""
    if AWQ >= 1:
        return (c // 2 + 4 * (c % 2)) * 4
    return c * 4


@triton.jit
def _x_cols(perm_ptr, offs_k, mask_k, HAS_PERM: tl.constexpr):
    """The x columns of weight rows offs_k: the rows themselves, or perm[offs_k] where the
    repack sorted act-order rows by group (`repack`)."""
    if HAS_PERM:
        return tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
    return offs_k


@triton.jit
def _unpack_tile(qweight_ptr, offs_n, offs_k, n0, k0, N, k_end,
                 AWQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] tile of 4-bit values q[n, k] (int32, 0..15), each packed word
    loaded once. GPTQ [K/8, N]: word [k/8, n] holds rows k..k+7 in order; AWQ [K, N/8]: word
    [k, n/8] holds columns n..n+7, column c at nibble c // 2 + 4 * (c % 2)."""
    nibble = tl.arange(0, 8)
    if AWQ:
        cols = n0 // 8 + tl.arange(0, BLOCK_N // 8)
        words = tl.load(qweight_ptr + offs_k[None, :] * (N // 8) + cols[:, None],
                        mask=(cols[:, None] < N // 8) & (offs_k[None, :] < k_end), other=0)
        shift = _nibble_shift(nibble, AWQ)
        q = (words[:, None, :] >> shift[None, :, None]) & 0xF        # [BLOCK_N/8, 8, BLOCK_K]
    else:
        rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(qweight_ptr + rows[None, :] * N + offs_n[:, None],
                        mask=(offs_n[:, None] < N) & (rows[None, :] * 8 < k_end), other=0)
        q = (words[:, :, None] >> (nibble * 4)[None, None, :]) & 0xF   # [BLOCK_N, BLOCK_K/8, 8]
    return tl.reshape(q, (BLOCK_N, BLOCK_K))


@triton.jit
def _unpack_tile_kn(qweight_ptr, offs_n, offs_k, n0, k0, N, k_end,
                    AWQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of 4-bit values q[k, n] (int32), K-major: the words in
    their checkpoint orientation (GPTQ [K/8, N], AWQ [K, N/8]), so a thread's values run
    along K (a GEMV reduces them in registers)."""
    nibble = tl.arange(0, 8)
    if AWQ:
        cols = n0 // 8 + tl.arange(0, BLOCK_N // 8)
        words = tl.load(qweight_ptr + offs_k[:, None] * (N // 8) + cols[None, :],
                        mask=(offs_k[:, None] < k_end) & (cols[None, :] < N // 8), other=0)
        shift = _nibble_shift(nibble, AWQ)
        q = (words[:, :, None] >> shift[None, None, :]) & 0xF        # [BLOCK_K, BLOCK_N/8, 8]
    else:
        rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=(rows[:, None] * 8 < k_end) & (offs_n[None, :] < N), other=0)
        q = (words[:, None, :] >> (nibble * 4)[None, :, None]) & 0xF   # [BLOCK_K/8, 8, BLOCK_N]
    return tl.reshape(q, (BLOCK_K, BLOCK_N))


@triton.jit
def _gemv_step(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, perm_ptr, offs_n, offs_m,
               n0, k0, k_end, M, N, stride_xm, group_size, zero_offset, AWQ: tl.constexpr,
               PER_ROW: tl.constexpr, ACT_ORDER: tl.constexpr, HAS_PERM: tl.constexpr,
               BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step of the GEMV form: [BLOCK_N, BLOCK_M] fp32, each output column reduced
    along K inside a thread (fp32 multiply-adds; (q << 16 | 0x43000000) read as fp32 is
    128 + q, zero and scale applied after the sum)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k_end
    q = _unpack_tile_kn(qweight_ptr, offs_n, offs_k, n0, k0, N, k_end, AWQ, BLOCK_N, BLOCK_K)
    mask_n = offs_n < N
    if PER_ROW:
        if ACT_ORDER:
            g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        else:
            g = offs_k // group_size
        mask = mask_k[:, None] & mask_n[None, :]
        z = _zeros_of(qzeros_ptr, g[:, None], offs_n[None, :], mask, zero_offset, N, AWQ)
        s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        w = (q - z).to(tl.float32) * s.to(tl.float32)
    else:
        g = k0 // group_size
        z = (_zeros_of(qzeros_ptr, g, offs_n, mask_n, zero_offset, N, AWQ) + 128).to(tl.float32)
        s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = ((q << 16) | 0x43000000).to(tl.float32, bitcast=True)
    out = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    x_cols = _x_cols(perm_ptr, offs_k, mask_k, HAS_PERM)
    for m in tl.static_range(BLOCK_M):
        row_ok = tl.full((BLOCK_K,), m, tl.int32) < M
        xm = tl.load(x_ptr + m * stride_xm + x_cols, mask=mask_k & row_ok, other=0.0).to(tl.float32)
        pm = tl.sum(w * xm[:, None], axis=0)                               # [BLOCK_N]
        if not PER_ROW:
            pm = s * (pm - z * tl.sum(xm, axis=0))
        out += tl.where(offs_m[None, :] == m, pm[:, None], 0.0)
    return out


@triton.jit
def _zeros_of(qzeros_ptr, g, offs_n, mask, zero_offset, N, AWQ: tl.constexpr):
    """Zero points (int32) of columns offs_n in groups g (broadcast; 0 where not mask)."""
    shift = _nibble_shift(offs_n % 8, AWQ)
    words = tl.load(qzeros_ptr + g * (N // 8) + offs_n // 8, mask=mask, other=0)
    return ((words >> shift) & 0xF) + zero_offset


@triton.jit
def _dot(w, xt, IEEE: tl.constexpr):
    """w [BLOCK_N, BLOCK_K] @ xt [BLOCK_K, BLOCK_M] on the tensor cores, fp32 out (IEEE:
    fp32 operands, for fp32 activations and the interpreter)."""
    if IEEE:
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
    return tl.dot(w.to(xt.dtype), xt)


@triton.jit(do_not_specialize=["M"])
def _w4a16_skinny_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, perm_ptr, bias_ptr,
                         y_ptr, partial_ptr, arrivals_ptr, M, N, K, stride_xm, stride_ym,
                         k_per_split, group_size, zero_offset,
                         AWQ: tl.constexpr, PER_ROW: tl.constexpr, ACT_ORDER: tl.constexpr,
                         HAS_PERM: tl.constexpr,
                         MAGIC: tl.constexpr, MAGIC_VALUE: tl.constexpr, IEEE: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         NUM_STAGES: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        if not DOT:
            acc += _gemv_step(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, perm_ptr,
                              offs_n, offs_m, n0, k0, k_end, M, N, stride_xm, group_size,
                              zero_offset, AWQ, PER_ROW, ACT_ORDER, HAS_PERM, BLOCK_M, BLOCK_N,
                              BLOCK_K)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_cols = _x_cols(perm_ptr, offs_k, offs_k < k_end, HAS_PERM)
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + x_cols[:, None],    # x^T tile
                         mask=(offs_k[:, None] < k_end) & mask_m[None, :], other=0.0)
            q = _unpack_tile(qweight_ptr, offs_n, offs_k, n0, k0, N, k_end, AWQ, BLOCK_N, BLOCK_K)
            if PER_ROW:   # each input row its own group: dequantize before the product
                if ACT_ORDER:
                    g = tl.load(g_idx_ptr + offs_k, mask=offs_k < k_end, other=0)
                else:
                    g = offs_k // group_size
                mask = mask_n[:, None] & (offs_k < k_end)[None, :]
                z = _zeros_of(qzeros_ptr, g[None, :], offs_n[:, None], mask, zero_offset, N, AWQ)
                s = tl.load(scales_ptr + g[None, :] * N + offs_n[:, None], mask=mask, other=0.0)
                w = (q - z).to(tl.float32) * s.to(tl.float32)
                acc += _dot(w, xt, IEEE)
            else:         # one group per K step: zero and scale applied after the product
                g = k0 // group_size
                z = _zeros_of(qzeros_ptr, g, offs_n, mask_n, zero_offset, N, AWQ)
                s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                if MAGIC:   # (q | MAGIC) as a 16-bit float is exactly MAGIC_VALUE + q
                    w = (q | MAGIC).to(tl.int16).to(xt.dtype, bitcast=True)
                    z = z + MAGIC_VALUE
                else:
                    w = q.to(tl.float32)
                part = _dot(w, xt, IEEE)
                xsum = tl.sum(xt.to(tl.float32), axis=0)                         # [BLOCK_M]
                acc += s[:, None] * (part - z.to(tl.float32)[:, None] * xsum[None, :])
    store_tile(acc, y_ptr, bias_ptr, partial_ptr, arrivals_ptr, pid_n, pid_k, offs_n, offs_m,
               mask_n, mask_m, stride_ym, HAS_BIAS, SPLIT, BLOCK_N, BLOCK_M)


@triton.jit
def _dequantize_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, k0, n0,
                     N, K, group_size, zero_offset, AWQ: tl.constexpr, PER_ROW: tl.constexpr,
                     ACT_ORDER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W^T tile [BLOCK_K, BLOCK_N] in fp32: one group for the tile (k0's), or PER_ROW each
    row with its own."""
    q = _unpack_tile_kn(qweight_ptr, offs_n, offs_k, n0, k0, N, K, AWQ, BLOCK_N, BLOCK_K)
    if not PER_ROW:
        g = k0 // group_size
        z = _zeros_of(qzeros_ptr, g, offs_n, offs_n < N, zero_offset, N, AWQ)
        s = tl.load(scales_ptr + g * N + offs_n, mask=offs_n < N, other=0.0)
        return (q - z[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]
    if ACT_ORDER:
        g = tl.load(g_idx_ptr + offs_k, mask=offs_k < K, other=0)
    else:
        g = offs_k // group_size
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    z = _zeros_of(qzeros_ptr, g[:, None], offs_n[None, :], mask, zero_offset, N, AWQ)
    s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    return (q - z).to(tl.float32) * s.to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _w4a16_tiled_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, perm_ptr, bias_ptr,
                        y_ptr, M, N, K, stride_xm, stride_ym, group_size, zero_offset,
                        AWQ: tl.constexpr, PER_ROW: tl.constexpr, ACT_ORDER: tl.constexpr,
                        HAS_PERM: tl.constexpr,
                        IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_cols = _x_cols(perm_ptr, offs_k, offs_k < K, HAS_PERM)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + x_cols[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _dequantize_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, k0,
                             n0, N, K, group_size, zero_offset, AWQ, PER_ROW, ACT_ORDER,
                             BLOCK_K, BLOCK_N)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, N, K,
                       group_size, zero_offset, AWQ: tl.constexpr, PER_ROW: tl.constexpr,
                       ACT_ORDER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out [K, N] (row-major, out's dtype) = W^T."""
    k0, n0 = tl.program_id(0) * BLOCK_K, tl.program_id(1) * BLOCK_N
    offs_k, offs_n = k0 + tl.arange(0, BLOCK_K), n0 + tl.arange(0, BLOCK_N)
    w = _dequantize_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, k0, n0,
                         N, K, group_size, zero_offset, AWQ, PER_ROW, ACT_ORDER, BLOCK_K, BLOCK_N)
    tl.store(out_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :],
             w.to(out_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


# The fp32 bit patterns that make a nibble a float without a convert: nibble j of a word,
# shifted left by _FMA_LSH[j] / right by _FMA_RSH[j], lands in bits 12-15 (exponent of 2048:
# the float is 2048 + q) or 16-19 (exponent of 128: 128 + q); nibbles 3 and 4 need no shift
# and 1, 2 (5, 6) share one. Per 8 weights: 4 shifts, 8 AND-ORs (one LOP3 each), 8 FMAs.
@triton.jit
def _fma_high(j, PRECISE: tl.constexpr):
    """Whether nibble j goes to bits 16-19 (base 128), else 12-15 (base 2048). PRECISE (fp32
    activations): all to 16-19. The 2048 base costs a sum (2048 + q) x some fp32 bits (about
    2e-4 of the output's scale): nothing next to bf16 rounding, too much for fp32."""
    if PRECISE:
        return j >= 0
    return (j == 2) | (j == 4) | (j >= 6)


@triton.jit
def _fma_base(j, PRECISE: tl.constexpr):
    """The float base_j of nibble j: 128 or 2048."""
    return tl.where(_fma_high(j, PRECISE), 128.0, 2048.0)


@triton.jit
def _fma_nibbles(words, j, PRECISE: tl.constexpr, lo_mask=0xF000, hi_mask=0xF0000):
    """words int32 and nibble indices j (broadcast together) -> fp32 base_j + q_j.
    lo_mask / hi_mask: 0xF000 / 0xF0000, passed to the kernel as arguments: as literals
    ptxas re-creates one with a move before every AND-OR (a LOP3 takes one immediate), a
    third instruction per weight."""
    if PRECISE:
        lsh = tl.where(j < 4, 16 - 4 * j, 0)
        rsh = tl.where(j > 4, 4 * j - 16, 0)
    else:
        lsh = tl.where(j == 0, 12, tl.where(j < 3, 8, 0))
        rsh = tl.where(j == 7, 12, tl.where((j == 5) | (j == 6), 8, 0))
    high = _fma_high(j, PRECISE)
    mask = tl.where(high, hi_mask, lo_mask)
    magic = tl.where(high, 0x43000000, 0x45000000)
    bits = (((words << lsh) >> rsh) & mask) | magic
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fma_row(words, xr, p0, p1, p2, p3, p4, p5, p6, p7, lo, hi, PRECISE: tl.constexpr):
    """p_j += (base_j + q_j) * x for the 8 nibbles of one input row's words [NW] (x: that
    row's activation, a scalar): one FMA chain per output column, K reduced in the thread."""
    p0 += _fma_nibbles(words, 0, PRECISE, lo, hi) * xr
    p1 += _fma_nibbles(words, 1, PRECISE, lo, hi) * xr
    p2 += _fma_nibbles(words, 2, PRECISE, lo, hi) * xr
    p3 += _fma_nibbles(words, 3, PRECISE, lo, hi) * xr
    p4 += _fma_nibbles(words, 4, PRECISE, lo, hi) * xr
    p5 += _fma_nibbles(words, 5, PRECISE, lo, hi) * xr
    p6 += _fma_nibbles(words, 6, PRECISE, lo, hi) * xr
    p7 += _fma_nibbles(words, 7, PRECISE, lo, hi) * xr
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _fma_group(acc, p, zw, xs, scales_ptr, g, cols, mask_c, N, zero_offset, J: tl.constexpr,
               PRECISE: tl.constexpr):
    """acc + s * (p - (base_J + z) * sum x) for the columns 8c + J of group g."""
    zb = (((zw >> (4 * J)) & 0xF) + zero_offset).to(tl.float32) + _fma_base(J, PRECISE)
    s = tl.load(scales_ptr + g * N + cols * 8 + _awq_col(J), mask=mask_c, other=0.0).to(tl.float32)
    return acc + s * (p - zb * xs)


@triton.jit
def _awq_col(J):
    """The column (within its 8) of nibble J: AWQ_ORDER[J]."""
    return 2 * (J % 4) + J // 4


@triton.jit
def _fma_row_dequant(words, xr, g, qzeros_ptr, scales_ptr, cols, mask, N, zero_offset,
                     p0, p1, p2, p3, p4, p5, p6, p7, PRECISE: tl.constexpr):
    """The per-row path: each weight of the row dequantized with the row's group g first."""
    zw = tl.load(qzeros_ptr + g * (N // 8) + cols, mask=mask, other=0)
    sp = scales_ptr + g * N + cols * 8
    p0 += _fma_weight(words, zw, sp, mask, zero_offset, 0, PRECISE) * xr
    p1 += _fma_weight(words, zw, sp, mask, zero_offset, 1, PRECISE) * xr
    p2 += _fma_weight(words, zw, sp, mask, zero_offset, 2, PRECISE) * xr
    p3 += _fma_weight(words, zw, sp, mask, zero_offset, 3, PRECISE) * xr
    p4 += _fma_weight(words, zw, sp, mask, zero_offset, 4, PRECISE) * xr
    p5 += _fma_weight(words, zw, sp, mask, zero_offset, 5, PRECISE) * xr
    p6 += _fma_weight(words, zw, sp, mask, zero_offset, 6, PRECISE) * xr
    p7 += _fma_weight(words, zw, sp, mask, zero_offset, 7, PRECISE) * xr
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _fma_weight(words, zw, sp, mask, zero_offset, J: tl.constexpr, PRECISE: tl.constexpr):
    z = (((zw >> (4 * J)) & 0xF) + zero_offset).to(tl.float32) + _fma_base(J, PRECISE)
    s = tl.load(sp + _awq_col(J), mask=mask, other=0.0).to(tl.float32)
    return (_fma_nibbles(words, J, PRECISE) - z) * s


@triton.jit
def _join8(a0, a1, a2, a3, a4, a5, a6, a7):
    """Eight [NW] tensors (nibbles 0..7) -> one [NW, 2, 2, 2] (tl.join pairs)."""
    return tl.join(tl.join(tl.join(a0, a1), tl.join(a2, a3)),
                   tl.join(tl.join(a4, a5), tl.join(a6, a7)))


@triton.jit
def _fma_row_x(x_ptr, perm_ptr, k, k_end, HAS_PERM: tl.constexpr, MASKED: tl.constexpr):
    """x[0, column of weight row k] in fp32 (MASKED: 0 past k_end)."""
    if MASKED:
        ok = tl.full((1,), k, tl.int32) < k_end
        if HAS_PERM:
            col = tl.load(perm_ptr + k + tl.arange(0, 1), mask=ok, other=0)
        else:
            col = k + tl.arange(0, 1)
        return tl.sum(tl.load(x_ptr + col, mask=ok, other=0.0).to(tl.float32), axis=0)
    if HAS_PERM:
        col = tl.load(perm_ptr + k)
    else:
        col = k
    return tl.load(x_ptr + col).to(tl.float32)


@triton.jit
def _w4a16_fma_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, perm_ptr, bias_ptr,
                      y_ptr, partial_ptr, arrivals_ptr, N, K, k_per_split,
                      group_size, zero_offset, lo, hi, PER_ROW: tl.constexpr, ACT_ORDER: tl.constexpr,
                      HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                      PRECISE: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """The one-row (M = 1) multiply-add kernel on the repacked layout (`repack`: words
    [K, N/8] packed along N in AWQ's order). A program owns BLOCK_N / 8 word columns (each
    thread whole words, 16-byte vectors) and walks its K range one row of words at a time:
    per weight a shift (shared by two nibbles), one AND-OR that makes it the float base + q
    (`_fma_nibbles`) and one fp32 FMA into its column's chain, so K is reduced inside the
    thread: no MMA padding, no shared-memory round trip of a dequantized tile, no
    cross-thread reduction until the split-K epilogue. The 8 nibbles of a word are 8
    separate tensors (a [.., 8] dimension would be spread over threads by the compiler).
    Zero and scale per group and column once per BLOCK_K rows (one group):
        sum_k (q - z) s x = s * (sum_k (base + q) x - (base + z) sum_k x).
    PER_ROW (act-order rows whose groups the repack could not make contiguous, or a group
    size no BLOCK_K >= 8 divides): each weight dequantized with its row's group first."""
    NW: tl.constexpr = BLOCK_N // 8
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_n * NW + tl.arange(0, NW)                          # word columns
    mask_c = cols < N // 8
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    a0 = tl.zeros((NW,), dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    p0 = tl.zeros((NW,), dtype=tl.float32)
    p1, p2, p3, p4, p5, p6, p7 = p0, p0, p0, p0, p0, p0, p0
    xs = 0.0
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        if PER_ROW:
            for r in tl.static_range(BLOCK_K):
                k = k0 + r
                mask = mask_c & (tl.full((NW,), k, tl.int32) < k_end)
                words = tl.load(qweight_ptr + k * (N // 8) + cols, mask=mask, other=0)
                if ACT_ORDER:
                    g = tl.sum(tl.load(g_idx_ptr + k + tl.arange(0, 1), mask=k + tl.arange(0, 1) < k_end,
                                       other=0), axis=0)
                else:
                    g = k // group_size
                a0, a1, a2, a3, a4, a5, a6, a7 = _fma_row_dequant(
                    words, _fma_row_x(x_ptr, perm_ptr, k, k_end, HAS_PERM, True), g, qzeros_ptr,
                    scales_ptr, cols, mask, N, zero_offset, a0, a1, a2, a3, a4, a5, a6, a7, PRECISE)
        else:
            # EVEN_K: every step's rows lie in [k_start, k_end) (K a multiple of BLOCK_K)
            for r in tl.static_range(BLOCK_K):
                k = k0 + r
                if EVEN_K:
                    if EVEN_N:
                        words = tl.load(qweight_ptr + k * (N // 8) + cols)
                    else:
                        words = tl.load(qweight_ptr + k * (N // 8) + cols, mask=mask_c, other=0)
                    xr = _fma_row_x(x_ptr, perm_ptr, k, k_end, HAS_PERM, False)
                else:
                    words = tl.load(qweight_ptr + k * (N // 8) + cols,
                                    mask=mask_c & (tl.full((NW,), k, tl.int32) < k_end), other=0)
                    xr = _fma_row_x(x_ptr, perm_ptr, k, k_end, HAS_PERM, True)
                xs += xr
                p0, p1, p2, p3, p4, p5, p6, p7 = _fma_row(words, xr, p0, p1, p2, p3, p4, p5,
                                                          p6, p7, lo, hi, PRECISE)
            # zero and scale once per group (or at the end of this program's K range)
            if ((k0 + BLOCK_K) % group_size == 0) | (k0 + BLOCK_K >= k_end):
                g = k0 // group_size
                zw = tl.load(qzeros_ptr + g * (N // 8) + cols, mask=mask_c, other=0)
                a0 = _fma_group(a0, p0, zw, xs, scales_ptr, g, cols, mask_c, N, zero_offset, 0, PRECISE)
                a1 = _fma_group(a1, p1, zw, xs, scales_ptr, g, cols, mask_c, N, zero_offset, 1, PRECISE)
                a2 = _fma_group(a2, p2, zw, xs, scales_ptr, g, cols, mask_c, N, zero_offset, 2, PRECISE)
                a3 = _fma_group(a3, p3, zw, xs, scales_ptr, g, cols, mask_c, N, zero_offset, 3, PRECISE)
                a4 = _fma_group(a4, p4, zw, xs, scales_ptr, g, cols, mask_c, N, zero_offset, 4, PRECISE)
                a5 = _fma_group(a5, p5, zw, xs, scales_ptr, g, cols, mask_c, N, zero_offset, 5, PRECISE)
                a6 = _fma_group(a6, p6, zw, xs, scales_ptr, g, cols, mask_c, N, zero_offset, 6, PRECISE)
                a7 = _fma_group(a7, p7, zw, xs, scales_ptr, g, cols, mask_c, N, zero_offset, 7, PRECISE)
                p0 = tl.zeros((NW,), dtype=tl.float32)
                p1, p2, p3, p4, p5, p6, p7 = p0, p0, p0, p0, p0, p0, p0
                xs = 0.0
    # the eight [NW] sums as one [BLOCK_N, 1] tile (columns 8c + j in the order the same
    # joins give the column numbers) for the shared split-K epilogue
    acc = tl.reshape(_join8(a0, a1, a2, a3, a4, a5, a6, a7), (BLOCK_N, 1))
    c8 = cols * 8
    offs_n = tl.reshape(_join8(c8, c8 + 2, c8 + 4, c8 + 6, c8 + 1, c8 + 3, c8 + 5, c8 + 7),
                        (BLOCK_N,))   # nibble j is column 8c + AWQ_ORDER[j]
    offs_m = tl.arange(0, 1)
    store_tile(acc, y_ptr, bias_ptr, partial_ptr, arrivals_ptr, pid_n, pid_k, offs_n, offs_m,
               offs_n < N, offs_m < 1, 0, HAS_BIAS, SPLIT, BLOCK_N, 1)


# ---- the streaming GEMV (M = 1, repacked) -----------------------------------------------------
# Built for HBM bandwidth at one row: every thread issues several 16-byte loads (4 words: 32
# weights of one input row) before it uses any, the program's [STEP, NW] word tile covers its
# threads exactly (no replicated loads), K is reduced inside each thread across its rows and
# across threads once at the end, and split-K spreads narrow layers over many programs with
# an epilogue whose reduction issues all its loads at once.

@triton.jit
def _start(qweight_ptr, k_start, k_end, stride_w, word0, NW: tl.constexpr, PDL: tl.constexpr,
           PREFETCH: tl.constexpr):
    """A decode kernel's entry under programmatic dependent launch (engine.kernels.pdl):
    PREFETCH, launched early, ask for this program's weight slice (rows k_start..k_end of
    words word0..word0 + NW: weights no kernel of the step writes) to come into L2 while the
    previous kernel finishes; then wait for it (`pdl.enter`), before any other load or
    store. Without PDL: nothing."""
    if PREFETCH:
        for k0 in tl.range(k_start, k_end, 128):
            rows = tl.minimum(k0 + tl.arange(0, 128), k_end - 1).to(tl.int64)
            pdl.prefetch_rows_l2(qweight_ptr + rows * stride_w + word0,
                                 tl.full((128,), NW * 4, tl.int32), PDL)
    pdl.enter(PDL)


@triton.jit
def _mn_tile(qweight_ptr, M, N, K, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """The mma and swap kernels' program (grid: output tile x K split): its tile and split
    ids, the tile's word columns, output columns and rows with their masks, and its K range;
    entered through `_start`."""
    NW: tl.constexpr = BLOCK_N // 8
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_n * NW + tl.arange(0, NW)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_c, mask_n, mask_m = cols < N // 8, offs_n < N, offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    _start(qweight_ptr, k_start, k_end, N // 8, pid_n * NW, NW, PDL, PREFETCH)
    return pid_n, pid_k, cols, offs_n, offs_m, mask_c, mask_n, mask_m, k_start, k_end


@triton.jit
def _stream_fold(t, ROWS: tl.constexpr):
    """[STEP, C] -> [ROWS, C]: row r + i * ROWS summed into row r. A program's threads cover
    ROWS rows, so rows ROWS apart are one thread's registers: the sum stays in the thread."""
    return tl.sum(tl.reshape(t, (t.shape[0] // ROWS, ROWS, t.shape[1])), axis=0)


@triton.jit
def _stream_split4(t, ROWS: tl.constexpr):
    """[4 ROWS, C] -> its four row blocks [ROWS, C] (rows u ROWS + r), each a thread's own
    registers (split along an in-thread dimension: no data moves)."""
    t = tl.permute(tl.reshape(t, (2, 2, ROWS, t.shape[1])), (2, 3, 0, 1))   # [ROWS, C, i, j]
    even, odd = tl.split(t)                    # u = 2 i + j: j = 0, j = 1
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def _stream_chain(p, w0, w1, w2, w3, x0, x1, x2, x3, J: tl.constexpr, PRECISE: tl.constexpr,
                  lo, hi):
    """p + sum_u (base + q_u) x_u for nibble J of the four row blocks: one FMA chain."""
    p += _fma_nibbles(w0, J, PRECISE, lo, hi) * x0
    p += _fma_nibbles(w1, J, PRECISE, lo, hi) * x1
    p += _fma_nibbles(w2, J, PRECISE, lo, hi) * x2
    p += _fma_nibbles(w3, J, PRECISE, lo, hi) * x3
    return p


@triton.jit
def _stream_x(x_ptr, perm_ptr, rows, mask, EVEN: tl.constexpr, HAS_PERM: tl.constexpr):
    """x[0, column of weight row r] in fp32 for rows [STEP, 1] (0 where not mask)."""
    if HAS_PERM:
        if EVEN:
            return tl.load(x_ptr + tl.load(perm_ptr + rows)).to(tl.float32)
        col = tl.load(perm_ptr + rows, mask=mask, other=0)
        return tl.load(x_ptr + col, mask=mask, other=0.0).to(tl.float32)
    if EVEN:
        return tl.load(x_ptr + rows).to(tl.float32)
    return tl.load(x_ptr + rows, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _stream_store(acc, offs_n, y_ptr, bias_ptr, partial_ptr, arrivals_ptr, pid_n, pid_k, N,
                  HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, RCHUNK: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """acc [BLOCK_N] fp32 of columns offs_n -> y (+ bias). SPLIT: each split stores its row
    of partial sums (fp32 [splits, tiles * BLOCK_N], columns in order) and counts itself in at
    the tile's counter; the split that arrives last sums the splits in split order
    (deterministic), RCHUNK splits' loads in flight at once, stores y and resets the counter
    for the next call."""
    if SPLIT:
        width = tl.num_programs(0) * BLOCK_N
        n_splits = tl.num_programs(1)
        tl.store(partial_ptr + pid_k * width + offs_n, acc)
        tl.debug_barrier()   # every thread's partial written before the counter moves
        arrived = tl.atomic_add(arrivals_ptr + pid_n, 1, sem="acq_rel")
        if arrived == n_splits - 1:
            tl.debug_barrier()
            n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s0 in tl.range(0, n_splits, RCHUNK):
                s = s0 + tl.arange(0, RCHUNK)
                part = tl.load(partial_ptr + s[:, None] * width + n[None, :],
                               mask=(s < n_splits)[:, None], other=0.0, cache_modifier=".cg")
                total += tl.sum(part, axis=0)
            if HAS_BIAS:
                total += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
            tl.store(y_ptr + n, total.to(y_ptr.dtype.element_ty), mask=n < N)
            tl.atomic_xchg(arrivals_ptr + pid_n, 0)   # ready for the next call
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _stream_scale_pair(scales_ptr, g, cols, mask_c, N, U: tl.constexpr):
    """The 16-bit scales of columns 8c + 2U, 8c + 2U + 1 (nibbles U, U + 4) of group g, both
    in one int32 (one 4-byte load)."""
    return tl.load(scales_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + g * (N // 2)
                   + cols * 4 + U, mask=mask_c, other=0)


@triton.jit
def _stream_terms(zw, pair, scales_ptr, zero_offset, U: tl.constexpr, PRECISE: tl.constexpr):
    """(base + z, s) in fp32 of nibbles U and U + 4 from the group's zero words zw and the
    scales `pair` (_stream_scale_pair)."""
    zb_lo = (((zw >> (4 * U)) & 0xF) + zero_offset).to(tl.float32) + _fma_base(U, PRECISE)
    zb_hi = (((zw >> (4 * U + 16)) & 0xF) + zero_offset).to(tl.float32) + _fma_base(U + 4, PRECISE)
    sdt: tl.constexpr = scales_ptr.dtype.element_ty
    s_lo = pair.to(tl.int16).to(sdt, bitcast=True).to(tl.float32)
    s_hi = (pair >> 16).to(tl.int16).to(sdt, bitcast=True).to(tl.float32)
    return zb_lo, zb_hi, s_lo, s_hi


@triton.jit
def _stream_flush(a_lo, a_hi, p_lo, p_hi, zw, xs, scales_ptr, g, cols, mask_c, N, zero_offset,
                  U: tl.constexpr, PRECISE: tl.constexpr):
    """a + s * (p - (base + z) * xs) for nibbles U and U + 4: the group's zero and scale
    applied to partial sums p (xs: the sums of x over the same rows), broadcast."""
    zb_lo, zb_hi, s_lo, s_hi = _stream_terms(
        zw, _stream_scale_pair(scales_ptr, g, cols, mask_c, N, U), scales_ptr, zero_offset, U,
        PRECISE)
    return a_lo + s_lo * (p_lo - zb_lo * xs), a_hi + s_hi * (p_hi - zb_hi * xs)


@triton.jit
def _w4a16_stream_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, perm_ptr, bias_ptr, y_ptr,
                         partial_ptr, arrivals_ptr, N, K, stride_w, k_per_split, group_size,
                         zero_offset, lo, hi, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SPLIT: tl.constexpr, ONE_GROUP: tl.constexpr, PRECISE: tl.constexpr,
                         EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr,
                         ROWS: tl.constexpr, STEP: tl.constexpr, RCHUNK: tl.constexpr,
                         NUM_STAGES: tl.constexpr, PDL: tl.constexpr = False,
                         PREFETCH: tl.constexpr = False, CHAIN: tl.constexpr = False):
    """The streaming one-row kernel on the repacked layout (words [K, N/8], stride_w = N/8).
    A program owns NW = BLOCK_N / 8 word columns and a K range; each step loads the
    [STEP, NW] word tile in one go: 4 words (a 16-byte load) per thread and row, the
    program's threads covering ROWS rows, so each thread issues STEP / ROWS loads before
    any is used. Per weight one AND-OR makes it the float base + q (`_fma_nibbles`) and one
    FMA multiplies it by its row's x into the thread's partial sum of its column, and
        sum_k (q - z) s x = s * (sum_k (base + q) x - (base + z) sum_k x)
    applies zero and scale per group: ONE_GROUP (the program's K range inside one group:
    k_per_split divides the group size) once, after the partial sums are reduced across
    the threads; else by each thread to its own partial sums at each group's end (one
    group per step: STEP divides the group size)."""
    NW: tl.constexpr = BLOCK_N // 8
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    cols = (pid_n * NW + tl.arange(0, NW))[None, :]                  # [1, NW] word columns
    mask_c = (cols < stride_w) | EVEN_N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    _start(qweight_ptr, k_start, k_end, stride_w, pid_n * NW, NW, PDL, PREFETCH)
    r = tl.arange(0, STEP)[:, None]
    zero = tl.zeros((ROWS, NW), dtype=tl.float32)
    p0, p1, p2, p3, p4, p5, p6, p7 = zero, zero, zero, zero, zero, zero, zero, zero
    a0, a1, a2, a3, a4, a5, a6, a7 = zero, zero, zero, zero, zero, zero, zero, zero
    xs = tl.zeros((ROWS, 1), dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, STEP, num_stages=NUM_STAGES):
        rows = k0 + r                                                 # [STEP, 1]
        mask_k = rows < k_end
        if EVEN_K and EVEN_N:
            words = tl.load(qweight_ptr + rows * stride_w + cols)
        else:
            words = tl.load(qweight_ptr + rows * stride_w + cols, mask=mask_k & mask_c, other=0)
        x = _stream_x(x_ptr, perm_ptr, rows, mask_k, EVEN_K, HAS_PERM)   # [STEP, 1]
        xs += _stream_fold(x, ROWS)
        if CHAIN:   # four loads per thread: one FMA chain per column, no adds
            w0, w1, w2, w3 = _stream_split4(words, ROWS)
            x0, x1, x2, x3 = _stream_split4(x, ROWS)
            p0 = _stream_chain(p0, w0, w1, w2, w3, x0, x1, x2, x3, 0, PRECISE, lo, hi)
            p1 = _stream_chain(p1, w0, w1, w2, w3, x0, x1, x2, x3, 1, PRECISE, lo, hi)
            p2 = _stream_chain(p2, w0, w1, w2, w3, x0, x1, x2, x3, 2, PRECISE, lo, hi)
            p3 = _stream_chain(p3, w0, w1, w2, w3, x0, x1, x2, x3, 3, PRECISE, lo, hi)
            p4 = _stream_chain(p4, w0, w1, w2, w3, x0, x1, x2, x3, 4, PRECISE, lo, hi)
            p5 = _stream_chain(p5, w0, w1, w2, w3, x0, x1, x2, x3, 5, PRECISE, lo, hi)
            p6 = _stream_chain(p6, w0, w1, w2, w3, x0, x1, x2, x3, 6, PRECISE, lo, hi)
            p7 = _stream_chain(p7, w0, w1, w2, w3, x0, x1, x2, x3, 7, PRECISE, lo, hi)
        else:
            p0 += _stream_fold(_fma_nibbles(words, 0, PRECISE, lo, hi) * x, ROWS)
            p1 += _stream_fold(_fma_nibbles(words, 1, PRECISE, lo, hi) * x, ROWS)
            p2 += _stream_fold(_fma_nibbles(words, 2, PRECISE, lo, hi) * x, ROWS)
            p3 += _stream_fold(_fma_nibbles(words, 3, PRECISE, lo, hi) * x, ROWS)
            p4 += _stream_fold(_fma_nibbles(words, 4, PRECISE, lo, hi) * x, ROWS)
            p5 += _stream_fold(_fma_nibbles(words, 5, PRECISE, lo, hi) * x, ROWS)
            p6 += _stream_fold(_fma_nibbles(words, 6, PRECISE, lo, hi) * x, ROWS)
            p7 += _stream_fold(_fma_nibbles(words, 7, PRECISE, lo, hi) * x, ROWS)
        if not ONE_GROUP:   # zero and scale at each group's end (or this program's K range's)
            if ((k0 + STEP) % group_size == 0) | (k0 + STEP >= k_end):
                g = k0 // group_size
                zw = tl.load(qzeros_ptr + g * stride_w + cols, mask=mask_c, other=0)
                a0, a4 = _stream_flush(a0, a4, p0, p4, zw, xs, scales_ptr, g, cols, mask_c, N,
                                       zero_offset, 0, PRECISE)
                a1, a5 = _stream_flush(a1, a5, p1, p5, zw, xs, scales_ptr, g, cols, mask_c, N,
                                       zero_offset, 1, PRECISE)
                a2, a6 = _stream_flush(a2, a6, p2, p6, zw, xs, scales_ptr, g, cols, mask_c, N,
                                       zero_offset, 2, PRECISE)
                a3, a7 = _stream_flush(a3, a7, p3, p7, zw, xs, scales_ptr, g, cols, mask_c, N,
                                       zero_offset, 3, PRECISE)
                p0, p1, p2, p3, p4, p5, p6, p7 = zero, zero, zero, zero, zero, zero, zero, zero
                xs = tl.zeros((ROWS, 1), dtype=tl.float32)
    c = pid_n * NW + tl.arange(0, NW)                                 # [NW] word columns
    if ONE_GROUP:   # the sums reduced across threads first, then zero and scale, once
        sums = tl.sum(_join8(p0, p1, p2, p3, p4, p5, p6, p7), axis=0)          # [NW, 2, 2, 2]
        x_sum = tl.sum(tl.sum(xs, axis=1), axis=0)
        g = k_start // group_size
        mask_w = (c < stride_w) | EVEN_N
        zw = tl.load(qzeros_ptr + g * stride_w + c, mask=mask_w, other=0)
        zb0, zb4, s0, s4 = _stream_terms(zw, _stream_scale_pair(scales_ptr, g, c, mask_w, N, 0),
                                         scales_ptr, zero_offset, 0, PRECISE)
        zb1, zb5, s1, s5 = _stream_terms(zw, _stream_scale_pair(scales_ptr, g, c, mask_w, N, 1),
                                         scales_ptr, zero_offset, 1, PRECISE)
        zb2, zb6, s2, s6 = _stream_terms(zw, _stream_scale_pair(scales_ptr, g, c, mask_w, N, 2),
                                         scales_ptr, zero_offset, 2, PRECISE)
        zb3, zb7, s3, s7 = _stream_terms(zw, _stream_scale_pair(scales_ptr, g, c, mask_w, N, 3),
                                         scales_ptr, zero_offset, 3, PRECISE)
        zb = _join8(zb0, zb1, zb2, zb3, zb4, zb5, zb6, zb7)
        s = _join8(s0, s1, s2, s3, s4, s5, s6, s7)
        acc = tl.reshape(s * (sums - zb * x_sum), (BLOCK_N,))
    else:           # the 8 nibbles joined to columns, the rows summed across threads, once
        acc = tl.reshape(tl.sum(_join8(a0, a1, a2, a3, a4, a5, a6, a7), axis=0), (BLOCK_N,))
    c8 = c * 8
    offs_n = tl.reshape(_join8(c8, c8 + 2, c8 + 4, c8 + 6, c8 + 1, c8 + 3, c8 + 5, c8 + 7),
                        (BLOCK_N,))   # nibble j is column 8c + AWQ_ORDER[j]
    _stream_store(acc, offs_n, y_ptr, bias_ptr, partial_ptr, arrivals_ptr, pid_n, pid_k, N,
                  HAS_BIAS, SPLIT, RCHUNK, BLOCK_N)


@triton.jit
def _bf16_pair(v, IEEE: tl.constexpr):
    """int32 [..] holding two bf16 bit patterns -> the low one and the high one as bf16
    (IEEE: as fp32; the interpreter computes on bf16's raw bits)."""
    lo = v.to(tl.int16).to(tl.bfloat16, bitcast=True)
    hi = (v >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    if IEEE:
        return lo.to(tl.float32), hi.to(tl.float32)
    return lo, hi


@triton.jit
def _sub_bf16x2(a, b):
    """Lane-wise a - b of two int32 tensors each holding a bf16 pair (sm_90 PTX)."""
    return tl.inline_asm_elementwise("sub.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _mul_bf16x2(a, b):
    """Lane-wise a * b of two int32 tensors each holding a bf16 pair (sm_90 PTX)."""
    return tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _scale_pair_bf16(scales_ptr, g, cols, mask, N, U: tl.constexpr):
    """The 16-bit scales of columns 8c + 2U, 8c + 2U + 1 (nibbles U, U + 4) of group g as one
    int32 holding their bf16 pair (one 4-byte load; fp16 scales rounded to bf16)."""
    sdt: tl.constexpr = scales_ptr.dtype.element_ty
    pair = tl.load(scales_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + g * (N // 2)
                   + cols * 4 + U, mask=mask, other=0)
    if sdt == tl.bfloat16:
        return pair
    lo = pair.to(tl.int16).to(sdt, bitcast=True).to(tl.bfloat16).to(tl.int16, bitcast=True)
    hi = (pair >> 16).to(tl.int16).to(sdt, bitcast=True).to(tl.bfloat16).to(tl.int16, bitcast=True)
    return (lo.to(tl.int32) & 0xFFFF) | (hi.to(tl.int32) << 16)


@triton.jit
def _mma_weight_tile(words, zw, zero_offset, IEEE: tl.constexpr, s0=None, s1=None, s2=None,
                     s3=None, FOLD: tl.constexpr = False):
    """The W^T tile [BLOCK_K, BLOCK_N] in bf16, q - z exact (integers -16..15), from words
    [BLOCK_K, BLOCK_N / 8] in AWQ's order and the group's zero words [BLOCK_N / 8]: per word
    4 shifts-and-ANDs-ORs, each making a bf16 pair (128 + q) of adjacent columns 2a, 2a + 1
    (nibbles a, a + 4), and a bf16 subtraction of the pair's (128 + z). FOLD: each pair then
    times its columns' scales (s0..s3 [BLOCK_N / 8]: bf16 pairs, _scale_pair_bf16), one
    bf16x2 multiply, so the tile is W^T itself rounded to bf16."""
    off = zero_offset * 0x00010001        # + offset in each 16-bit lane (z + offset <= 16)
    v0 = (words & 0x000F000F) | 0x43004300
    v1 = ((words >> 4) & 0x000F000F) | 0x43004300
    v2 = ((words >> 8) & 0x000F000F) | 0x43004300
    v3 = ((words >> 12) & 0x000F000F) | 0x43004300
    z0 = (((zw & 0x000F000F) + off) | 0x43004300)[None, :]
    z1 = ((((zw >> 4) & 0x000F000F) + off) | 0x43004300)[None, :]
    z2 = ((((zw >> 8) & 0x000F000F) + off) | 0x43004300)[None, :]
    z3 = ((((zw >> 12) & 0x000F000F) + off) | 0x43004300)[None, :]
    if IEEE:   # the interpreter: in fp32
        lo0, hi0 = _bf16_pair(v0, IEEE)
        lo1, hi1 = _bf16_pair(v1, IEEE)
        lo2, hi2 = _bf16_pair(v2, IEEE)
        lo3, hi3 = _bf16_pair(v3, IEEE)
        zl0, zh0 = _bf16_pair(z0, IEEE)
        zl1, zh1 = _bf16_pair(z1, IEEE)
        zl2, zh2 = _bf16_pair(z2, IEEE)
        zl3, zh3 = _bf16_pair(z3, IEEE)
        d0l, d0h, d1l, d1h = lo0 - zl0, hi0 - zh0, lo1 - zl1, hi1 - zh1
        d2l, d2h, d3l, d3h = lo2 - zl2, hi2 - zh2, lo3 - zl3, hi3 - zh3
        if FOLD:   # the products rounded to bf16 as the GPU's bf16x2 multiply rounds them
            sl0, sh0 = _bf16_pair(s0[None, :], IEEE)
            sl1, sh1 = _bf16_pair(s1[None, :], IEEE)
            sl2, sh2 = _bf16_pair(s2[None, :], IEEE)
            sl3, sh3 = _bf16_pair(s3[None, :], IEEE)
            d0l, d0h = (d0l * sl0).to(tl.bfloat16).to(tl.float32), (d0h * sh0).to(tl.bfloat16).to(tl.float32)
            d1l, d1h = (d1l * sl1).to(tl.bfloat16).to(tl.float32), (d1h * sh1).to(tl.bfloat16).to(tl.float32)
            d2l, d2h = (d2l * sl2).to(tl.bfloat16).to(tl.float32), (d2h * sh2).to(tl.bfloat16).to(tl.float32)
            d3l, d3h = (d3l * sl3).to(tl.bfloat16).to(tl.float32), (d3h * sh3).to(tl.bfloat16).to(tl.float32)
    elif FOLD:  # one bf16x2 subtraction and one multiply per pair
        d0l, d0h = _bf16_pair(_mul_bf16x2(_sub_bf16x2(v0, tl.broadcast_to(z0, v0.shape)),
                                          tl.broadcast_to(s0[None, :], v0.shape)), IEEE)
        d1l, d1h = _bf16_pair(_mul_bf16x2(_sub_bf16x2(v1, tl.broadcast_to(z1, v1.shape)),
                                          tl.broadcast_to(s1[None, :], v1.shape)), IEEE)
        d2l, d2h = _bf16_pair(_mul_bf16x2(_sub_bf16x2(v2, tl.broadcast_to(z2, v2.shape)),
                                          tl.broadcast_to(s2[None, :], v2.shape)), IEEE)
        d3l, d3h = _bf16_pair(_mul_bf16x2(_sub_bf16x2(v3, tl.broadcast_to(z3, v3.shape)),
                                          tl.broadcast_to(s3[None, :], v3.shape)), IEEE)
    else:      # one bf16x2 subtraction per pair (the compiler would split it in two)
        d0l, d0h = _bf16_pair(_sub_bf16x2(v0, tl.broadcast_to(z0, v0.shape)), IEEE)
        d1l, d1h = _bf16_pair(_sub_bf16x2(v1, tl.broadcast_to(z1, v1.shape)), IEEE)
        d2l, d2h = _bf16_pair(_sub_bf16x2(v2, tl.broadcast_to(z2, v2.shape)), IEEE)
        d3l, d3h = _bf16_pair(_sub_bf16x2(v3, tl.broadcast_to(z3, v3.shape)), IEEE)
    # column 8c + 4 a1 + 2 a0 + b (a = 2 a1 + a0; b: low / high half) from nested joins,
    # innermost b, then a0, then a1, so the reshape keeps each thread's registers in place
    lo = tl.join(tl.join(d0l, d2l), tl.join(d1l, d3l))
    hi = tl.join(tl.join(d0h, d2h), tl.join(d1h, d3h))
    t = tl.join(lo, hi)                                     # [BLOCK_K, NW, a1, a0, b]
    return tl.reshape(t, (words.shape[0], words.shape[1] * 8))


@triton.jit
def _tile_words(qweight_ptr, rows, cols, mask_k, mask_c, N, EVEN_K: tl.constexpr,
                EVEN_N: tl.constexpr):
    """The repacked words of rows x word columns `cols` ([BLOCK_K, BLOCK_N // 8] int32);
    EVEN_K / EVEN_N (K, N multiples of the tile): no row / column masks, a plain load."""
    ptrs = qweight_ptr + rows[:, None] * (N // 8) + cols[None, :]
    if EVEN_K and EVEN_N:
        words = tl.load(ptrs)
    else:
        words = tl.load(ptrs, mask=mask_k[:, None] & (mask_c[None, :] | EVEN_N), other=0)
    return words


@triton.jit(do_not_specialize=["M"])
def _w4a16_mma_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, perm_ptr, bias_ptr, y_ptr,
                      partial_ptr, arrivals_ptr, M, N, K, stride_xm, stride_ym, k_per_split,
                      group_size, zero_offset, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                      EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                      PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """The tensor-core decode kernel on the repacked layout (M <= 64, bf16 activations; one
    group per K step): acc[BLOCK_M, BLOCK_N] += x tile @ W^T tile, the W^T tile made in
    registers from each thread's own words (`_mma_weight_tile`: about one instruction per
    weight, q - z exact in bf16) and handed to the MMA (through shared memory, as the
    compiler stages a B operand), the group's scale applied to the step's fp32 product."""
    pid_n, pid_k, cols, offs_n, offs_m, mask_c, mask_n, mask_m, k_start, k_end = _mn_tile(
        qweight_ptr, M, N, K, k_per_split, BLOCK_M, BLOCK_N, PDL, PREFETCH)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        rows = k0 + tl.arange(0, BLOCK_K)
        # EVEN_K / EVEN_N (K, N multiples of the tile): no row / column masks on the weights
        mask_k = (rows < k_end) | EVEN_K
        x_cols = _x_cols(perm_ptr, rows, mask_k, HAS_PERM)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + x_cols[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        words = _tile_words(qweight_ptr, rows, cols, mask_k, mask_c, N, EVEN_K, EVEN_N)
        g = k0 // group_size
        zw = tl.load(qzeros_ptr + g * (N // 8) + cols, mask=mask_c | EVEN_N, other=0)
        w = _mma_weight_tile(words, zw, zero_offset, IEEE)
        s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n | EVEN_N, other=0.0).to(tl.float32)
        if IEEE:
            part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(x, w)
        acc += part * s[None, :]
    store_tile(tl.trans(acc), y_ptr, bias_ptr, partial_ptr, arrivals_ptr, pid_n, pid_k, offs_n,
               offs_m, mask_n, mask_m, stride_ym, HAS_BIAS, SPLIT, BLOCK_N, BLOCK_M)


@triton.jit(do_not_specialize=["M"])
def _w4a16_swap_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, perm_ptr, bias_ptr, y_ptr,
                       partial_ptr, arrivals_ptr, M, N, K, stride_xm, stride_ym, k_per_split,
                       group_size, zero_offset, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SPLIT: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                       EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                       PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """The mma kernel's swapped form (M <= 64, bf16 activations, one group per K step):
    acc[BLOCK_N, BLOCK_M] += W tile @ x^T tile, the weights the MMA's wide operand (64 rows
    per warp group on sm_90, M only the narrow one: 16 at decode sizes) and taken from
    registers (wgmma's A operand: the dequantized tile never goes through shared memory),
    x^T the operand staged through shared memory by the pipeline; the scale folded into the
    tile (W in bf16, as dequantize + cuBLAS rounds it) so the MMA accumulates in place and
    runs while the next tile is dequantized."""
    pid_n, pid_k, cols, offs_n, offs_m, mask_c, mask_n, mask_m, k_start, k_end = _mn_tile(
        qweight_ptr, M, N, K, k_per_split, BLOCK_M, BLOCK_N, PDL, PREFETCH)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        rows = k0 + tl.arange(0, BLOCK_K)
        mask_k = (rows < k_end) | EVEN_K
        x_cols = _x_cols(perm_ptr, rows, mask_k, HAS_PERM)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + x_cols[:, None],
                     mask=mask_k[:, None] & mask_m[None, :], other=0.0)       # [BLOCK_K, BLOCK_M]
        words = _tile_words(qweight_ptr, rows, cols, mask_k, mask_c, N, EVEN_K, EVEN_N)
        g = k0 // group_size
        mask_g = mask_c | EVEN_N
        zw = tl.load(qzeros_ptr + g * (N // 8) + cols, mask=mask_g, other=0)
        wt = _mma_weight_tile(words, zw, zero_offset, IEEE,
                              _scale_pair_bf16(scales_ptr, g, cols, mask_g, N, 0),
                              _scale_pair_bf16(scales_ptr, g, cols, mask_g, N, 1),
                              _scale_pair_bf16(scales_ptr, g, cols, mask_g, N, 2),
                              _scale_pair_bf16(scales_ptr, g, cols, mask_g, N, 3), FOLD=True)
        if IEEE:
            acc = tl.dot(tl.trans(wt.to(tl.float32)), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(wt), xt, acc)
    store_tile(acc, y_ptr, bias_ptr, partial_ptr, arrivals_ptr, pid_n, pid_k, offs_n, offs_m,
               mask_n, mask_m, stride_ym, HAS_BIAS, SPLIT, BLOCK_N, BLOCK_M)


# ---- the nibble-sliced tensor-core kernel (M <= 64, repacked) ---------------------------------
# Nibble j of every repacked word is output column 8c + AWQ_ORDER[j] of word column c, so the
# words tile [BLOCK_K, NW] holds eight column slices of W^T. Eight tensor-core products per K
# step, one per slice, share the x tile. The words are loaded from the pipeline's shared
# memory into registers in a layout whose reshapes (`_slice_tile`: rows paired, halves
# joined) land exactly on the MMA operand's, so the dequantized slices never go back
# through shared memory (sm_90 TTGIR: linear layouts, no convert_layout or local_alloc of a
# slice; the mma and swap kernels store and reload their bf16 tile every step, with barriers).

@triton.jit
def _slice_tile(words, J: tl.constexpr, IEEE: tl.constexpr):
    """Slice J of a words tile [BLOCK_K, NW]: [BLOCK_K, NW] of 128 + q (bf16; IEEE: fp32),
    q the nibble J of each word (column 8c + AWQ_ORDER[J]). Rows are paired first: the 16-bit
    halves of rows 2r and 2r + 1 that hold nibble J go into one word, so one shift and one
    AND-OR make both bf16 values (q | 0x4300 as bf16 is exactly 128 + q) in the register
    pair the MMA operand takes (two rows of one column); the compiler keeps the reshapes
    in registers (sm_90: ~2 SASS instructions per weight, HMMA included)."""
    BLOCK_K: tl.constexpr = words.shape[0]
    NW: tl.constexpr = words.shape[1]
    even, odd = tl.split(tl.permute(tl.reshape(words, (BLOCK_K // 2, 2, NW)), (0, 2, 1)))
    if J < 4:   # nibbles 0-3: the low halves of rows 2r (bits 0-15) and 2r + 1 (16-31)
        pair = (even & 0xFFFF) | (odd << 16)
    else:       # nibbles 4-7: the high halves
        pair = ((even >> 16) & 0xFFFF) | (odd & -65536)
    v = ((pair >> (4 * (J % 4))) & 0x000F000F) | 0x43004300
    lo = v.to(tl.int16).to(tl.bfloat16, bitcast=True)             # row 2r
    hi = (v >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)     # row 2r + 1
    if IEEE:   # the interpreter computes on bf16's raw bits: fp32 operands
        lo, hi = lo.to(tl.float32), hi.to(tl.float32)
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_K, NW))


@triton.jit
def _slice_dot(acc, x, xs, words, zw, scales_ptr, g, cols, mask_c, N, zero_offset,
               J: tl.constexpr, IEEE: tl.constexpr):
    """acc + s * (x @ (128 + q_J) - (128 + z) * sum_k x) for slice J (columns 8c +
    AWQ_ORDER[J]) of one group's K step: acc [BLOCK_M, NW] fp32, x [BLOCK_M, BLOCK_K], xs
    [BLOCK_M, 1] its row sums in fp32, words [BLOCK_K, NW], zw the group's zero words [NW]."""
    w = _slice_tile(words, J, IEEE)
    if IEEE:   # fp32 operands (fp32 activations, the interpreter)
        p = tl.dot(x.to(tl.float32), w, input_precision="ieee")
    else:
        p = tl.dot(x, w)
    zb = (((zw >> (4 * J)) & 0xF) + zero_offset + 128).to(tl.float32)
    s = tl.load(scales_ptr + g * N + cols * 8 + _awq_col(J), mask=mask_c, other=0.0).to(tl.float32)
    return acc + s[None, :] * (p - zb[None, :] * xs)


@triton.jit(do_not_specialize=["M", "m_blocks"])
def _w4a16_slice_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, perm_ptr, bias_ptr, y_ptr,
                        partial_ptr, arrivals_ptr, M, N, K, stride_xm, stride_ym, k_per_split,
                        group_size, zero_offset, m_blocks, HAS_PERM: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                        EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                        PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """The nibble-sliced tensor-core kernel (M <= 64, bf16 activations, one group per K
    step) on the repacked layout: per K step eight products x tile @ slice J of the W^T
    tile (`_slice_dot`), zero and scale applied to each slice's fp32 product per group
    (sum_k (q - z) s x = s * (sum_k (128 + q) x - (128 + z) sum_k x)). BLOCK_M 16 or 32
    (mma.v2, both operands in registers: at 64 rows the compiler would pick wgmma, whose
    weight operand goes through shared memory); more rows run as m_blocks programs of
    BLOCK_M rows per tile, adjacent in the grid so the second reads the words from L2.
    Grid axis 0: tile x M block, axis 1: K split."""
    NW: tl.constexpr = BLOCK_N // 8
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // m_blocks, pid % m_blocks
    cols = pid_n * NW + tl.arange(0, NW)
    offs_m = tl.arange(0, BLOCK_M)
    rows_left = M - pid_m * BLOCK_M
    x_ptr += pid_m * BLOCK_M * stride_xm
    y_ptr += pid_m * BLOCK_M * stride_ym
    mask_c, mask_m = (cols < N // 8) | EVEN_N, offs_m < rows_left
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    _start(qweight_ptr, k_start, k_end, N // 8, pid_n * NW, NW, PDL, PREFETCH)
    a0 = tl.zeros((BLOCK_M, NW), dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        rows = k0 + tl.arange(0, BLOCK_K)
        mask_k = (rows < k_end) | EVEN_K
        x_cols = _x_cols(perm_ptr, rows, mask_k, HAS_PERM)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + x_cols[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)    # [BLOCK_M, BLOCK_K]
        words = _tile_words(qweight_ptr, rows, cols, mask_k, mask_c, N, EVEN_K, EVEN_N)
        xs = tl.sum(x.to(tl.float32), axis=1)[:, None]
        g = k0 // group_size
        zw = tl.load(qzeros_ptr + g * (N // 8) + cols, mask=mask_c, other=0)
        a0 = _slice_dot(a0, x, xs, words, zw, scales_ptr, g, cols, mask_c, N, zero_offset, 0, IEEE)
        a1 = _slice_dot(a1, x, xs, words, zw, scales_ptr, g, cols, mask_c, N, zero_offset, 1, IEEE)
        a2 = _slice_dot(a2, x, xs, words, zw, scales_ptr, g, cols, mask_c, N, zero_offset, 2, IEEE)
        a3 = _slice_dot(a3, x, xs, words, zw, scales_ptr, g, cols, mask_c, N, zero_offset, 3, IEEE)
        a4 = _slice_dot(a4, x, xs, words, zw, scales_ptr, g, cols, mask_c, N, zero_offset, 4, IEEE)
        a5 = _slice_dot(a5, x, xs, words, zw, scales_ptr, g, cols, mask_c, N, zero_offset, 5, IEEE)
        a6 = _slice_dot(a6, x, xs, words, zw, scales_ptr, g, cols, mask_c, N, zero_offset, 6, IEEE)
        a7 = _slice_dot(a7, x, xs, words, zw, scales_ptr, g, cols, mask_c, N, zero_offset, 7, IEEE)
    # the eight slices as one [BLOCK_M, BLOCK_N] tile, columns in the order the same joins
    # give the column numbers (slice j is column 8c + AWQ_ORDER[j])
    acc = tl.reshape(_join8(a0, a1, a2, a3, a4, a5, a6, a7), (BLOCK_M, BLOCK_N))
    c8 = cols * 8
    offs_n = tl.reshape(_join8(c8, c8 + 2, c8 + 4, c8 + 6, c8 + 1, c8 + 3, c8 + 5, c8 + 7),
                        (BLOCK_N,))
    store_tile(tl.trans(acc), y_ptr, bias_ptr, partial_ptr, arrivals_ptr, pid, pid_k, offs_n,
               offs_m, offs_n < N, mask_m, stride_ym, HAS_BIAS, SPLIT, BLOCK_N, BLOCK_M)


# ---- launch rules --------------------------------------------------------------------------

GPTQ, AWQ, REPACKED = 0, 1, 2   # W4.packing


class W4(NamedTuple):
    """One quantized weight: its tensors and their layout (engine.layers.quant documents the
    checkpoint ones). packing: GPTQ (qweight [K/8, N], words along K), AWQ ([K, N/8], words
    along N in AWQ's interleaved order) or REPACKED (`repack`: AWQ's layout, qzeros
    likewise; rows of an act-order weight sorted by group, x read through `perm`).
    qzeros of GPTQ are N-packed in natural order too. (A bool packing reads as GPTQ / AWQ.)"""
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    packing: int
    group_size: int      # -1: one group over all K
    act_order: bool      # rows' groups from g_idx (else row // group_size)
    zero_offset: int
    perm: torch.Tensor | None = None   # REPACKED: weight row r multiplies x[:, perm[r]]

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
        n = self.scales.shape[1]
        k = self.qweight.shape[0] * (8 if self.packing == GPTQ else 1)
        return n, k


def weight_of(layer) -> W4:
    """The W4 of a quantized linear layer: as loaded, or as `repack_layer` left it."""
    if getattr(layer, "w4_repacked", None) is not None:
        return layer.w4_repacked
    q = layer.quant
    return W4(layer.qweight, layer.qzeros, layer.scales, getattr(layer, "g_idx", None),
              int(q.method == "awq"), q.group_size, q.desc_act, q.zero_offset)


# ---- the load-time repack --------------------------------------------------------------------

def _unpack(words: torch.Tensor, along_rows: bool, interleaved: bool = False) -> torch.Tensor:
    """int32 words -> uint8 values 0..15: along_rows [R, C] -> [8R, C] (row 8r + i is nibble
    i of word [r, c]); else [R, C] -> [R, 8C] (column 8c + i is nibble i, or AWQ's order)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    if along_rows:
        v = (words.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF
        return v.reshape(-1, words.shape[1]).to(torch.uint8)
    v = (words.unsqueeze(2) >> shifts.view(1, 1, 8)) & 0xF       # [R, C, 8] nibble order
    if interleaved:   # nibble i is column AWQ_ORDER[i]: column c is nibble c // 2 + 4 (c % 2)
        v = v[:, :, [c // 2 + 4 * (c % 2) for c in range(8)]]
    return v.reshape(words.shape[0], -1).to(torch.uint8)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble i of an N-packed word is column AWQ_ORDER[i]


def _pack_cols(values: torch.Tensor) -> torch.Tensor:
    """uint8 [R, 8C] -> int32 [R, C] in AWQ's order: nibble i (bits 4i..4i+3) is column
    8c + AWQ_ORDER[i]."""
    v = values.view(values.shape[0], -1, 8).to(torch.int32)
    out = v[:, :, AWQ_ORDER[0]].clone()
    for i in range(1, 8):
        out |= v[:, :, AWQ_ORDER[i]] << (4 * i)   # int32 shifts wrap: nibble 7 sets the sign bit
    return out


@torch.no_grad()
def repack(w: W4, rows_per_chunk: int = 2048) -> W4:
    """The kernel layout (REPACKED) of a GPTQ or AWQ weight, computed once at load time:
    qweight [K, N/8] and qzeros [G, N/8] packed along N in AWQ's interleaved order (the
    multiply-add kernel's threads own whole words of one input row: 8 output columns each;
    nibbles i and i + 4 are adjacent columns, so one AND-OR makes a bf16 pair of them, as
    AWQ's kernels use it). An AWQ weight is that already (its tensors are kept); an act-order
    weight's rows sorted by group (stable), so its groups are contiguous again and run the
    fast path, x read through `perm`; where the sorted groups are not `group_size` rows each
    (a tensor-parallel rank's slice of act-order rows) g_idx stays, sorted, and the per-row
    path runs. Bytes as before (plus perm: 4 per input row)."""
    if w.packing == REPACKED:
        return w
    if w.packing == AWQ:
        return w._replace(packing=REPACKED)
    n, k = w.shape
    zeros = _unpack(w.qzeros, False)   # GPTQ: natural order
    perm, g_idx, act_order = None, w.g_idx, w.act_order
    if w.act_order:
        g_idx, perm = torch.sort(w.g_idx, stable=True)
        group = w.group_size if w.group_size != -1 else k
        rows = torch.arange(k, device=g_idx.device, dtype=g_idx.dtype)
        act_order = not torch.equal(g_idx, rows // group)
        g_idx = g_idx.to(torch.int32).contiguous() if act_order else None
        perm = perm.to(torch.int32)
    qweight = torch.empty((k, n // 8), dtype=torch.int32, device=w.qweight.device)
    for r0 in range(0, k, rows_per_chunk):   # bounded scratch on 28672 x 4096 layers
        r1 = min(k, r0 + rows_per_chunk)
        if perm is None:
            q = _unpack(w.qweight[r0 // 8: r1 // 8], True)
        else:
            idx = perm[r0:r1].long()
            q = ((w.qweight[idx // 8] >> (4 * (idx % 8)).to(torch.int32)[:, None]) & 0xF).to(torch.uint8)
        qweight[r0:r1] = _pack_cols(q)
    return W4(qweight, _pack_cols(zeros), w.scales, g_idx, REPACKED, w.group_size, act_order,
              w.zero_offset, perm)


def block_m(m: int) -> int:
    """x rows per skinny program: tl.dot's 16, else 64 (two variants to compile, not three;
    at decode sizes the padded MMA costs far less than the weight read)."""
    return 16 if m <= 16 else 64


def group_block_k(block_k: int, group: int) -> int:
    """The K step of a skinny launch with one group per step: the largest power of two <=
    block_k dividing `group` (at least 16, tl.dot's minimum), or 0 where none does (the
    per-row path runs)."""
    while block_k >= 16 and group % block_k:
        block_k //= 2
    return block_k if block_k >= 16 else 0


def default_split_k(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """Split K until about PROGRAMS_PER_SM programs per SM, at least MIN_K_PER_SPLIT (and one
    K step) of K per program. Llama-3.1-8B on 132 SMs at BLOCK_N 128: qkv 6, o 8, gate_up 2,
    down 9."""
    tiles = triton.cdiv(n, block_n)
    by_k = max(1, k // max(MIN_K_PER_SPLIT, block_k))
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, tiles), by_k, MAX_SPLIT_K))


def split_candidates(n: int, k: int, tile: Launch, sms: int) -> list[int]:
    """The rule's split first, then half and twice it."""
    s = default_split_k(n, k, tile.block_n, tile.block_k, sms)
    return list(dict.fromkeys((s, max(1, s // 2), min(2 * s, MAX_SPLIT_K, max(1, k // tile.block_k)))))


def default_launch(m: int) -> Launch:
    return SKINNY_TILES[block_m(m)][0] if m <= MAX_M else TILED


def max_rows(launch: Launch) -> float:
    """The most rows a launch kind takes."""
    return {"skinny": MAX_M, "gemv": GEMV_MAX_M, "fma": FMA_MAX_M, "stream": 1,
            "mma": MAX_M, "swap": MAX_M, "slice": MAX_M}.get(launch.kind, float("inf"))


# ---- the three ways ------------------------------------------------------------------------

def _common(x: torch.Tensor, w: W4, bias: torch.Tensor | None):
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"w4a16: x {tuple(x.shape)} must be [M, {k}]")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"w4a16: bias {tuple(bias.shape)} must be [{n}]")
    x = x if x.stride(1) == 1 else x.contiguous()
    group = k if w.group_size == -1 else w.group_size
    ieee = x.dtype == torch.float32 or _INTERPRETED
    placeholder = w.qweight
    extra = (w.qweight if w.g_idx is None else w.g_idx, placeholder if bias is None else bias,
             placeholder if w.perm is None else w.perm)
    return x, n, k, group, ieee, extra


def w4a16_skinny(x: torch.Tensor, w: W4, bias: torch.Tensor | None, launch: Launch) -> torch.Tensor:
    """The decode kernel on x [M, K]: launch kind "skinny" (tensor cores, 1 <= M <= MAX_M) or
    "gemv" (fp32 multiply-adds, 1 <= M <= GEMV_MAX_M)."""
    x, n, k, group, ieee, (g_idx, bias_arg, perm) = _common(x, w, bias)
    m = x.shape[0]
    dot = launch.kind == "skinny"
    if not 1 <= m <= max_rows(launch):
        raise ValueError(f"w4a16 {launch.kind} kernel takes 1..{max_rows(launch)} rows, got {m}")
    bk = 0 if w.act_order else group_block_k(launch.block_k, group)
    per_row = bk == 0
    bk = bk or launch.block_k
    split = launch.split_k or default_split_k(n, k, launch.block_n, bk, num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    splits, tiles = triton.cdiv(k, k_per_split), triton.cdiv(n, launch.block_n)
    bm = block_m(m) if dot else triton.next_power_of_2(m)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = arrivals = y
    if splits > 1:
        partial, arrivals = workspace(x.device, splits * tiles * launch.block_n * bm, tiles)
    magic, value = _MAGIC.get(x.dtype, (0, 0))   # fp32: plain conversion
    _w4a16_skinny_kernel[(tiles, splits)](
        x, w.qweight, w.qzeros, w.scales, g_idx, perm, bias_arg, y, partial, arrivals,
        m, n, k, x.stride(0), y.stride(0), k_per_split, group, w.zero_offset,
        AWQ=int(w.packing), PER_ROW=per_row, ACT_ORDER=w.act_order, HAS_PERM=w.perm is not None,
        MAGIC=magic, MAGIC_VALUE=value,
        IEEE=ieee, HAS_BIAS=bias is not None, SPLIT=splits > 1, DOT=dot, BLOCK_M=bm,
        BLOCK_N=launch.block_n, BLOCK_K=bk, NUM_STAGES=launch.num_stages,
        num_warps=launch.num_warps)
    return y


def fma_block_k(block_k: int, group: int) -> int:
    """The fma kernel's K step: the largest power of two <= block_k dividing `group` (one
    group per step), or 0 where none >= 8 does (the per-row path runs)."""
    while block_k >= 8 and group % block_k:
        block_k //= 2
    return block_k if block_k >= 8 else 0


def w4a16_fma(x: torch.Tensor, w: W4, bias: torch.Tensor | None, launch: Launch) -> torch.Tensor:
    """The multiply-add decode kernel (`_w4a16_fma_kernel`) on x [M, K], 1 <= M <= FMA_MAX_M;
    w must be REPACKED."""
    if w.packing != REPACKED:
        raise ValueError("w4a16 fma kernel: the weight must be repacked first (w4a16.repack)")
    x, n, k, group, _, (g_idx, bias_arg, perm) = _common(x, w, bias)
    m = x.shape[0]
    if not 1 <= m <= FMA_MAX_M:
        raise ValueError(f"w4a16 fma kernel takes 1..{FMA_MAX_M} rows, got {m}")
    bk = 0 if w.act_order else fma_block_k(launch.block_k, group)
    per_row = bk == 0
    bk = bk or 8   # per-row steps of 8 rows (16 spill registers on sm_90)
    split = launch.split_k or default_split_k(n, k, launch.block_n, bk, num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    splits, tiles = triton.cdiv(k, k_per_split), triton.cdiv(n, launch.block_n)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = arrivals = y
    if splits > 1:
        partial, arrivals = workspace(x.device, splits * tiles * launch.block_n, tiles)
    for row in range(m):   # FMA_MAX_M rows, one launch each (the kernel is built for M = 1)
        _w4a16_fma_kernel[(tiles, splits)](
            x[row], w.qweight, w.qzeros, w.scales, g_idx, perm, bias_arg, y[row], partial,
            arrivals, n, k, k_per_split, group, w.zero_offset, 0xF000, 0xF0000,
            PER_ROW=per_row, ACT_ORDER=w.act_order, HAS_PERM=w.perm is not None,
            HAS_BIAS=bias is not None, SPLIT=splits > 1, PRECISE=x.dtype == torch.float32,
            EVEN_K=k % bk == 0, EVEN_N=n % launch.block_n == 0, BLOCK_N=launch.block_n,
            BLOCK_K=bk, NUM_STAGES=launch.num_stages,
            num_warps=launch.num_warps)
    return y


def stream_rows(launch: Launch) -> int:
    """Rows a stream program's threads cover: one 16-byte load (4 words) per thread each."""
    return max(1, 128 * launch.num_warps // (launch.block_n // 8))


def stream_step(launch: Launch, group: int) -> int:
    """The stream kernel's K step: the largest power-of-two multiple of stream_rows <=
    block_k dividing `group` (one group per step), or 0 where none does (it does not run)."""
    rows, step = stream_rows(launch), launch.block_k
    while step >= rows and group % step:
        step //= 2
    return step if step >= rows and step % rows == 0 else 0


def stream_fits(w: W4, launch: Launch, dtype: torch.dtype) -> bool:
    """Whether the stream kernel takes this weight: repacked, groups contiguous (act-order
    rows sorted by the repack), a group size some step divides, 16-bit scales."""
    n, k = w.shape
    group = k if w.group_size == -1 else w.group_size
    step = stream_step(launch, group)
    return (w.packing == REPACKED and not w.act_order and step > 0
            and (not launch.chain or step == 4 * stream_rows(launch))
            and w.scales.element_size() == 2
            and dtype in (torch.bfloat16, torch.float16, torch.float32))


def stream_split_k(n: int, k: int, launch: Launch, step: int, sms: int) -> int:
    """About STREAM_WARPS_PER_SM warps per SM, at least 2 K steps per program. Llama-3.1-8B
    on 132 SMs, 4-warp 512-column tiles: qkv 44, o 66, gate_up 10, down 66."""
    tiles = triton.cdiv(n, launch.block_n)
    want = triton.cdiv(STREAM_WARPS_PER_SM * sms, tiles * launch.num_warps)
    return max(1, min(want, k // (2 * step), MAX_STREAM_SPLIT_K))


def w4a16_stream(x: torch.Tensor, w: W4, bias: torch.Tensor | None, launch: Launch) -> torch.Tensor:
    """The streaming one-row kernel (`_w4a16_stream_kernel`) on x [1, K]; w REPACKED with
    contiguous groups (stream_fits)."""
    if not stream_fits(w, launch, x.dtype):
        raise ValueError("w4a16 stream kernel: needs a repacked weight with contiguous groups "
                         f"(no act-order kept) whose group size a {stream_rows(launch)}-row step "
                         "divides (the FMA-chain form: a step of 4 loads per thread), 16-bit "
                         "scales, and fp16 / bf16 / fp32 activations")
    x, n, k, group, _, (_, bias_arg, perm) = _common(x, w, bias)
    if x.shape[0] != 1:
        raise ValueError(f"w4a16 stream kernel takes 1 row, got {x.shape[0]}")
    step = stream_step(launch, group)
    split = launch.split_k or stream_split_k(n, k, launch, step, num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, split), step) * step
    splits, tiles = triton.cdiv(k, k_per_split), triton.cdiv(n, launch.block_n)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    partial = arrivals = y
    if splits > 1:
        partial, arrivals = workspace(x.device, splits * tiles * launch.block_n, tiles)
    _w4a16_stream_kernel[(tiles, splits)](
        x, w.qweight, w.qzeros, w.scales, perm, bias_arg, y, partial, arrivals, n, k, n // 8,
        k_per_split, group, w.zero_offset, 0xF000, 0xF0000, HAS_PERM=w.perm is not None,
        HAS_BIAS=bias is not None, SPLIT=splits > 1, ONE_GROUP=group % k_per_split == 0,
        PRECISE=x.dtype == torch.float32, EVEN_K=k % k_per_split == 0,
        EVEN_N=n % launch.block_n == 0, BLOCK_N=launch.block_n, ROWS=stream_rows(launch),
        STEP=step, RCHUNK=max(1, min(triton.next_power_of_2(splits),
                                     2048 * launch.num_warps // launch.block_n)),
        NUM_STAGES=launch.num_stages, CHAIN=launch.chain, num_warps=launch.num_warps,
        **_pdl_args(w, n % launch.block_n == 0, launch))
    return y


def w4a16_mma(x: torch.Tensor, w: W4, bias: torch.Tensor | None, launch: Launch) -> torch.Tensor:
    """A tensor-core decode kernel on x [M, K], 1 <= M <= MAX_M, bf16 (or fp32: tests)
    activations, as launch.kind names it: "mma" (`_w4a16_mma_kernel`), "swap"
    (`_w4a16_swap_kernel`) or "slice" (`_w4a16_slice_kernel`); w REPACKED, one group per K
    step (mma_fits)."""
    if not mma_fits(w, launch.block_k, x.dtype, launch.kind):
        raise ValueError(f"w4a16 {launch.kind} kernel: needs a repacked weight without per-row "
                         "groups (act-order kept, or a group size the K step does not divide) "
                         "and bf16 activations")
    x, n, k, group, ieee, (_, bias_arg, perm) = _common(x, w, bias)
    m = x.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"w4a16 {launch.kind} kernel takes 1..{MAX_M} rows, got {m}")
    if launch.kind == "slice" and launch.block_m not in (16, 32):
        raise ValueError(f"w4a16 slice kernel: block_m must be 16 or 32 (mma.v2 programs), "
                         f"got {launch.block_m}")
    bk = launch.block_k
    split = launch.split_k or default_split_k(n, k, launch.block_n, bk, num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    splits, tiles = triton.cdiv(k, k_per_split), triton.cdiv(n, launch.block_n)
    bm = launch.block_m if launch.kind == "slice" else block_m(m)
    m_blocks = triton.cdiv(m, bm) if launch.kind == "slice" else 1   # slice: rows in programs of bm
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = arrivals = y
    if splits > 1:
        partial, arrivals = workspace(x.device, splits * tiles * m_blocks * launch.block_n * bm,
                                      tiles * m_blocks)
    kernel = {"swap": _w4a16_swap_kernel, "slice": _w4a16_slice_kernel}.get(launch.kind, _w4a16_mma_kernel)
    kernel[(tiles * m_blocks, splits)](
        x, w.qweight, w.qzeros, w.scales, perm, bias_arg, y, partial, arrivals,
        m, n, k, x.stride(0), y.stride(0), k_per_split, group, w.zero_offset,
        *((m_blocks,) if launch.kind == "slice" else ()),
        HAS_PERM=w.perm is not None, HAS_BIAS=bias is not None, SPLIT=splits > 1, IEEE=ieee,
        EVEN_K=k % bk == 0, EVEN_N=n % launch.block_n == 0,
        BLOCK_M=bm, BLOCK_N=launch.block_n, BLOCK_K=bk, NUM_STAGES=launch.num_stages,
        num_warps=launch.num_warps, **_pdl_args(w, n % launch.block_n == 0, launch))
    return y


def _pdl_args(w: W4, even_n: bool, launch: Launch) -> dict:
    """The PDL constexprs and launch attribute of a repacked-layout decode launch
    (engine.kernels.pdl: on where the engine enabled it and launch.pdl asks for it); the L2
    prefetch of the weight slice (PDL_PREFETCH) where every program's slice is whole 16-byte
    pieces (N a multiple of the tile: each slice is BLOCK_N / 2 bytes at a 16-byte aligned
    offset of its row)."""
    on = pdl.enabled() and launch.pdl != PDL_OFF
    prefetch = (on and launch.pdl == PDL_PREFETCH and even_n and w.qweight.data_ptr() % 16 == 0
                and w.qweight.stride(0) * 4 % 16 == 0)
    return dict(PDL=on, PREFETCH=prefetch, **(pdl.launch_kwargs() if on else {}))


def slice_fits(m: int, launch: Launch) -> bool:
    """Whether a slice tile is a candidate at M rows: at most two programs of its block_m rows
    per tile (each program dequantizes the tile again), and no 32-row programs for <= 16."""
    return launch.block_m in (16, 32) and m <= 2 * launch.block_m and (m > 16 or launch.block_m == 16)


def mma_fits(w: W4, block_k: int, dtype: torch.dtype, kind: str = "mma") -> bool:
    """Whether the mma (or slice) kernel takes this weight: repacked, one group per K step,
    bf16 activations (its dequantized tile is bf16; fp32 for tests); the swapped form (kind
    "swap", which rounds the scaled weights to bf16) bf16 activations and 16-bit scales."""
    n, k = w.shape
    group = k if w.group_size == -1 else w.group_size
    dtypes = (torch.bfloat16,) if kind == "swap" else (torch.bfloat16, torch.float32)
    return (w.packing == REPACKED and not w.act_order and group % block_k == 0
            and dtype in dtypes and (kind != "swap" or w.scales.element_size() == 2))


def per_row(w: W4, group: int, block_k: int) -> bool:
    """Whether a K step of block_k rows may span groups (act-order, or block_k not dividing
    the group size): then every row is dequantized with its own group."""
    return w.act_order or group % block_k != 0


def w4a16_tiled(x: torch.Tensor, w: W4, bias: torch.Tensor | None,
                launch: Launch = TILED) -> torch.Tensor:
    """The tiled (prefill) kernel on x [M, K]."""
    x, n, k, group, ieee, (g_idx, bias_arg, perm) = _common(x, w, bias)
    m = x.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, launch.block_m), triton.cdiv(n, launch.block_n))
    _w4a16_tiled_kernel[grid](
        x, w.qweight, w.qzeros, w.scales, g_idx, perm, bias_arg, y, m, n, k, x.stride(0),
        y.stride(0), group, w.zero_offset, AWQ=int(w.packing),
        PER_ROW=per_row(w, group, launch.block_k), ACT_ORDER=w.act_order,
        HAS_PERM=w.perm is not None, IEEE=ieee, HAS_BIAS=bias is not None, BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        BLOCK_K=launch.block_k, num_warps=launch.num_warps,
        num_stages=launch.num_stages)
    return y


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_RETIRED: dict[torch.device, list[torch.Tensor]] = {}   # outgrown: captured graphs may still use them


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The shared dequantization buffer of at least `numel` elements; grown, never freed."""
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.setdefault(device, []).append(buf)
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[(device, dtype)] = buf
    return buf


def drop_buffers(device: torch.device) -> None:
    """Forget the device's scratch buffers (engine.kernels.buffers: no graph uses them any more)."""
    for key in [key for key in _SCRATCH if key[0] == device]:
        del _SCRATCH[key]
    _RETIRED.pop(device, None)


def dequantize_into(w: W4, out: torch.Tensor, block_k: int = 64, block_n: int = 128) -> torch.Tensor:
    """W^T [K, N] in out's dtype, written into `out` (>= K * N elements); returns the view."""
    n, k = w.shape
    wt = out[: k * n].view(k, n)
    group = k if w.group_size == -1 else w.group_size
    _dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        w.qweight, w.qzeros, w.scales, w.qweight if w.g_idx is None else w.g_idx, wt, n, k,
        group, w.zero_offset, AWQ=int(w.packing), PER_ROW=per_row(w, group, block_k),
        ACT_ORDER=w.act_order, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return wt


def w4a16_dequant(x: torch.Tensor, w: W4, bias: torch.Tensor | None) -> torch.Tensor:
    """W^T dequantized into the shared scratch buffer, then torch's matmul (x's columns in
    the repacked row order first, where the repack sorted act-order rows)."""
    n, k = w.shape
    wt = dequantize_into(w, scratch(x.device, x.dtype, n * k))
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    return torch.addmm(bias, x, wt) if bias is not None else x @ wt


def w4a16_matmul(x: torch.Tensor, w: W4, bias: torch.Tensor | None = None,
                 launch: Launch | None = None) -> torch.Tensor:
    """x [M, K] (fp16 / bf16 / fp32) times the dequantized W [N, K]^T (+ bias) -> [M, N] in
    x's dtype, run as `launch` says (None: skinny with the default tile and split for
    M <= MAX_M, else tiled)."""
    launch = launch or default_launch(x.shape[0])
    if launch.kind in ("skinny", "gemv"):
        return w4a16_skinny(x, w, bias, launch)
    if launch.kind == "fma":
        return w4a16_fma(x, w, bias, launch)
    if launch.kind in ("mma", "swap", "slice"):
        return w4a16_mma(x, w, bias, launch)
    if launch.kind == "stream":
        return w4a16_stream(x, w, bias, launch)
    if launch.kind == "tiled":
        return w4a16_tiled(x, w, bias, launch)
    if launch.kind == "dequant":
        return w4a16_dequant(x, w, bias)
    raise ValueError(f"w4a16: unknown launch kind {launch.kind!r}")


def w4a16_linear(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A quantized linear layer (engine.layers.quant) on x [..., K], following the layer's
    `w4a16` plan ((measured rows M, Launch), ...) ascending: a call of R rows takes the entry
    of the smallest M >= R, above the largest the largest's (without a plan: default_launch)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows = x2.shape[0]
    plan = getattr(layer, "w4a16", ())
    launch = None
    for measured, entry in plan:
        launch = entry
        if rows <= measured:
            break
    if launch is None or rows > max_rows(launch):
        launch = default_launch(rows)
    if rows == 0:
        y = x2.new_empty((0, layer.scales.shape[1]))
    else:
        y = w4a16_matmul(x2, weight_of(layer), bias, launch)
    return y.view(*shape[:-1], y.shape[-1])


# ---- the load-time choice ------------------------------------------------------------------

def quantized_layers(model: torch.nn.Module) -> dict[tuple, list[torch.nn.Module]]:
    """(N, K, format, group size, act-order, zero offset, has bias) -> the quantized linear
    layers of that shape (engine.layers.quant.quantize_linears)."""
    groups: dict[tuple, list[torch.nn.Module]] = {}
    for module in model.modules():
        if getattr(module, "quant", None) is None or not hasattr(module, "qweight"):
            continue
        w = weight_of(module)
        key = (*w.shape, w.packing, w.group_size, w.act_order, w.zero_offset,
               getattr(module, "bias", None) is not None)
        groups.setdefault(key, []).append(module)
    return groups


def fma_split_k(n: int, k: int, tile: Launch, sms: int) -> int:
    """The fma kernel's split: about FMA_WARPS_PER_SM warps per SM (its programs are small:
    one to four warps, each streaming whole words), at least 2 K steps per program."""
    tiles = triton.cdiv(n, tile.block_n)
    want = triton.cdiv(FMA_WARPS_PER_SM * sms, tiles * tile.num_warps)
    return max(1, min(want, k // (2 * tile.block_k), MAX_FMA_SPLIT_K))


def candidates(m: int, n: int, k: int, sms: int, w: W4 | None = None,
               dtype: torch.dtype = torch.bfloat16) -> list[Launch]:
    """What choose_w4a16 times at M rows for weight w (its layout decides; None: a
    checkpoint-layout one), the default first: the skinny tiles at a few splits
    (M <= MAX_M), the GEMV variant (M <= GEMV_MAX_M); on repacked weights the stream tiles
    (M = 1) at their rule's split, twice it, one group and half a group per program, the fma
    kernel's first tile at its rule's split, half and twice it (M <= FMA_MAX_M) and the mma, swap
    and slice kernels' (M <= MAX_M, where they fit: mma_fits, slice_fits) at the skinny rule's
    splits (the slice tiles at one row: the rule's and twice it) (and of the checkpoint
    kernels only the skinny tiles at the rule's split); the tiled kernel (M >= 32),
    dequantize + cuBLAS (always: it also stands in should no kernel variant fit)."""
    packing = GPTQ if w is None else w.packing
    out = []
    # on repacked weights the checkpoint-layout kernels stay as the baseline (the skinny tiles
    # at the rule's split; the GEMV form not: the fma kernel is its successor)
    splits = (lambda tile: split_candidates(n, k, tile, sms)[:1 if packing == REPACKED else 3])
    if m <= MAX_M:
        out += [tile._replace(split_k=s) for tile in SKINNY_TILES[block_m(m)] for s in splits(tile)]
    if m <= GEMV_MAX_M and packing != REPACKED:
        out += [tile._replace(split_k=s) for tile in GEMV_TILES for s in splits(tile)]
    if m <= FMA_MAX_M and packing == REPACKED:
        # H200 (session 6): the stream kernel beat every fma tile on every Llama-3.1-8B shape
        # by 5-15%; the fastest of them everywhere stays a candidate, the others are not timed
        for tile in FMA_TILES[:1]:
            s = fma_split_k(n, k, tile, sms)
            out += [tile._replace(split_k=x) for x in dict.fromkeys(
                (s, max(1, s // 2), min(2 * s, MAX_FMA_SPLIT_K, max(1, k // tile.block_k))))]
    if m == 1 and w is not None:
        group = k if w.group_size == -1 else w.group_size
        for tile in STREAM_TILES:
            if stream_fits(w, tile, dtype):
                s = stream_split_k(n, k, tile, stream_step(tile, group), sms)
                # the rule's split and twice it; one group or half a group per program
                splits = (s, 2 * s, k // group, 2 * k // group)
                out += [tile._replace(split_k=x) for x in dict.fromkeys(splits)   # a split of
                        if 1 <= x <= MAX_STREAM_SPLIT_K and k // x >= stream_step(tile, group)]   # >= 1 step
                if stream_step(tile, group) == 4 * stream_rows(tile) and k // group <= MAX_STREAM_SPLIT_K:
                    out.append(tile._replace(split_k=k // group, chain=True))   # one group each
    if m <= MAX_M and w is not None:
        tiles = (MMA_TILES[block_m(m)] + SWAP_TILES[block_m(m)]
                 + tuple(t for t in SLICE_TILES if slice_fits(m, t)))
        for tile in (t for t in tiles if mma_fits(w, t.block_k, dtype, t.kind)):
            splits = split_candidates(n, k, tile, sms)   # (s, s / 2, 2 s); at one row the
            if m == 1 and tile.kind == "slice":         # slice tiles at s and 2 s only
                splits = [splits[0], *splits[2:]]
            out += [tile._replace(split_k=s) for s in splits]
    if m >= 32:
        out.append(TILED)
    return out + [Launch("dequant")]


def pick(timed: list[tuple[float, Launch]]) -> tuple[float, Launch]:
    """(us, launch) to use of the timed candidates: the first (the default) unless another
    is MIN_GAIN faster, then the fastest."""
    fastest = min(timed, key=lambda t: t[0])
    return fastest if fastest[0] < (1 - MIN_GAIN) * timed[0][0] else timed[0]


@torch.inference_mode()
def choose_w4a16(model: torch.nn.Module, m_values: list[int] | None = None, repeats: int = 7,
                 time_us=None, max_layers: int = 4, verify: bool = True,
                 pdl_rows: int = 0) -> list[dict]:
    """Per quantized layer shape and row count M (default: the CUDA-graph sizes up to MAX_M,
    policy.cuda_graphs, then PREFILL_M), time every `candidates` launch, each under a CUDA
    graph of one pass over the shape's layers (all of them up to MAX_M rows, so the weights
    come from HBM as in a decode step; `max_layers` above, where the matmul is compute-bound),
    and set each layer's `w4a16` plan ((M, Launch), ...) ascending, which w4a16_linear
    follows. A candidate replaces the default (the first) only when MIN_GAIN faster. Call
    once after loading and before graph capture: it also compiles every variant a call can
    select, sizes the split-K workspace, and allocates the dequantization scratch (for the
    largest layer) when any plan uses it. Returns one row per (shape, M) with the timings.
    verify: each candidate's product (first layer of the shape) is checked against the torch
    reference (reference_product); one off by more than VERIFY_TOL is never chosen (reported
    under `failed`), so a kernel that computes wrong on some device cannot win on speed.
    pdl_rows: the row counts up to which the engine launches its kernels with programmatic
    dependent launch (EngineConfig.pdl_max_tokens where PDL is on, engine.kernels.pdl): those
    M are timed with it on, as the step's graphs run them (each launch's weights prefetched
    into L2 while the previous kernel finishes), the others with it off; there the three
    fastest are timed again without the prefetch and without PDL (pdl_alternatives), and
    the plan keeps the launch's mode (Launch.pdl).
    time_us ((fn, M, launch) -> microseconds of one fn() call): for tests on the CPU."""
    from policy.cuda_graphs import capture_sizes
    groups = quantized_layers(model)
    if not groups:
        return []
    m_values = sorted(set(m_values or (capture_sizes(MAX_M) + list(PREFILL_M))))
    time_us = time_us or (lambda fn, m, launch: graph_time_us(fn, repeats))
    first = next(iter(groups.values()))[0]
    device = first.qweight.device
    dtype = activation_dtype(model)
    largest = max(key[0] * key[1] for key in groups)
    scratch(device, dtype, largest)   # allocated before timing: the candidates share it
    sms = num_sms(device)
    report = []
    pdl_was = pdl.enabled()
    try:
        for key, layers in groups.items():
            report += _choose_shape(key, layers, m_values, time_us, max_layers, verify, pdl_rows,
                                    device, dtype, sms)
    finally:
        pdl.enable(pdl_was)
    if not any(launch.kind == "dequant" for layers in groups.values()
               for _, launch in layers[0].w4a16):
        _SCRATCH.pop((device, dtype), None)   # nobody uses it: give the memory back
    return report


def activation_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a quantized model's layers take and return (its floating parameters but
    the 4-bit groups' scales)."""
    return next(p.dtype for name, p in model.named_parameters()
                if p.is_floating_point() and not name.endswith("scales"))


@torch.inference_mode()
def prepare_w4a16(model: torch.nn.Module, pdl_rows: int = 0) -> None:
    """What choose_w4a16 leaves besides the plans, for layers whose `w4a16` plans were set
    without timing (engine.kernel_plan.apply): the dequantization scratch for the largest
    layer where any plan uses it (else none), and each plan entry's launch run once on its
    shape's first layer with its M rows (zeros; with PDL on where M <= pdl_rows, as steps
    launch them), so every variant the plans select is compiled and the split-K workspace
    sized before graph capture. Times nothing."""
    groups = quantized_layers(model)
    if not groups:
        return
    device = next(iter(groups.values()))[0].qweight.device
    dtype = activation_dtype(model)
    if any(launch.kind == "dequant" for layers in groups.values() for _, launch in layers[0].w4a16):
        scratch(device, dtype, max(key[0] * key[1] for key in groups))
    else:
        _SCRATCH.pop((device, dtype), None)
    pdl_was = pdl.enabled()
    try:
        for layers in groups.values():
            w, bias = weight_of(layers[0]), layers[0].bias
            for m, launch in layers[0].w4a16:
                pdl.enable(pdl.supported(device) and m <= pdl_rows)
                w4a16_matmul(torch.zeros(m, w.shape[1], dtype=dtype, device=device), w, bias, launch)
    finally:
        pdl.enable(pdl_was)


def _choose_shape(key, layers, m_values, time_us, max_layers, verify, pdl_rows, device, dtype,
                  sms) -> list[dict]:
    """choose_w4a16 for the layers of one shape (quantized_layers' key): sets their plan,
    returns the report rows."""
    n, k = key[0], key[1]
    gen = torch.Generator(device).manual_seed(n + k)
    plan, report = [], []
    for m in m_values:
        pdl.enable(pdl.supported(device) and m <= pdl_rows)
        timed_layers = layers if m <= MAX_M else layers[:max_layers]
        params = [(weight_of(layer), layer.bias) for layer in timed_layers]
        x = torch.randn(m, k, device=device, generator=gen).to(dtype)
        ref = reference_product(x, *params[0]) if verify else None
        times, failed = _time_launches(candidates(m, n, k, sms, weight_of(layers[0]), dtype),
                                       x, params, ref, time_us, m, device)
        if pdl.enabled():   # the fastest again with the weight prefetch, and PDL, off
            more, more_failed = _time_launches(pdl_alternatives(times), x, params, ref, time_us,
                                               m, device)
            times, failed = times + more, {**failed, **more_failed}
        if not times:
            raise RuntimeError(f"w4a16: no launch runs for a {n} x {k} layer at M={m}: {failed}")
        us, best = pick(times)
        plan.append((m, best))
        report.append(dict(n=n, k=k, format=("gptq", "awq", "repacked")[key[2]], group=key[3],
                           act_order=key[4], layers=len(layers), m=m, pdl=pdl.enabled(),
                           times_us={_name(l): t for t, l in times}, failed=failed,
                           choice=_name(best), us=us))
    for layer in layers:
        layer.w4a16 = tuple(plan)
    return report


def _time_launches(launches, x, params, ref, time_us, m, device) -> tuple[list, dict]:
    """([(us per layer, launch)] of the launches that run here and compute right (within
    VERIFY_TOL of ref, None: unchecked), {name: why} of the others), each timed over `params`
    ([(W4, bias)], the layers of one shape)."""
    times, failed = [], {}
    for launch in launches:
        try:
            us = time_us(lambda: [w4a16_matmul(x, w, b, launch) for w, b in params], m, launch)
            error = relative_error(w4a16_matmul(x, *params[0], launch), ref) if ref is not None else 0.0
        except _LAUNCH_ERRORS as e:   # e.g. a tile that needs more shared memory
            device_still_sound(device)
            failed[_name(launch)] = f"{type(e).__name__}: {str(e)[:120]}"
            continue
        if not error <= VERIFY_TOL:   # a wrong product is never chosen (NaN included)
            failed[_name(launch)] = f"wrong product: relative error {error:.2e}"
            continue
        times.append((us / len(params), launch))
    return times, failed


PDL_KINDS = ("stream", "slice", "swap", "mma")   # the launches Launch.pdl applies to


def pdl_alternatives(timed: list[tuple[float, Launch]], top: int = 3) -> list[Launch]:
    """The `top` fastest of the timed (us, launch) that launch with PDL and the weight
    prefetch, each with the prefetch off (PDL_WAIT) and with PDL off (PDL_OFF): what the
    load-time choice times next where the engine launches with PDL. (H200, session 7: with
    PDL and the prefetch the engine's 4-bit decode steps measured slower than session 6's
    without, batch 1 3.85 ms against 3.67, batch 16 8.00 against 5.97, bf16 unchanged; a
    slice of the repacked words is 64-128 byte pieces of many rows, one bulk prefetch each.)"""
    best = sorted((t for t in timed if t[1].kind in PDL_KINDS and t[1].pdl == PDL_PREFETCH),
                  key=lambda t: t[0])[:top]
    return [launch._replace(pdl=mode) for _, launch in best for mode in (PDL_WAIT, PDL_OFF)]


VERIFY_TOL = 3e-2   # relative_error a candidate may show (bf16 products: ~4e-3; a broken one: ~1)


def reference_product(x: torch.Tensor, w: W4, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ bias) in fp32 by the torch reference dequantization of w's layout."""
    from engine.layers import quant
    if w.packing == REPACKED:
        dense = quant.dequantize_repacked(w.qweight, w.qzeros, w.scales, w.g_idx, w.perm,
                                          w.group_size, w.zero_offset)
    elif w.packing == AWQ:
        dense = quant.dequantize_awq(w.qweight, w.qzeros, w.scales, w.group_size)
    else:
        k = w.shape[1]
        g_idx = w.g_idx if w.g_idx is not None else (
            torch.arange(k, device=x.device) // (k if w.group_size == -1 else w.group_size))
        dense = quant.dequantize_gptq(w.qweight, w.qzeros, w.scales, g_idx, w.zero_offset)
    y = x.float() @ dense.t()
    return y + bias.float() if bias is not None else y


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (NaN where y is not finite)."""
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# a variant that does not compile or fit here (RuntimeError: Triton's MLIR pass failures)
_LAUNCH_ERRORS = (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError,
                  RuntimeError)


def device_still_sound(device: torch.device) -> None:
    """After one of _LAUNCH_ERRORS: raises if the device is not sound (a CUDA error is
    sticky: synchronizing raises it), so only a variant that never ran is skipped."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def launch_name(launch: Launch) -> str:
    """A launch at a glance, e.g. "stream512x32w4/s44", "slice16x256x128w4p3/s4/nopdl"."""
    name = _tile_name(launch)
    if launch.kind in PDL_KINDS and launch.pdl != PDL_PREFETCH:
        name += "/wait" if launch.pdl == PDL_WAIT else "/nopdl"
    return name


_name = launch_name


def _tile_name(launch: Launch) -> str:
    if launch.kind == "stream":   # tiles that differ only in their pipeline stages: p<stages>
        stages = f"p{launch.num_stages}" if launch.num_stages > 1 else ""
        chain = "c" if launch.chain else ""
        return (f"stream{launch.block_n}x{launch.block_k}w{launch.num_warps}{stages}{chain}"
                f"/s{launch.split_k}")
    if launch.kind == "slice":   # rows per program first
        return (f"slice{launch.block_m}x{launch.block_n}x{launch.block_k}w{launch.num_warps}"
                f"p{launch.num_stages}/s{launch.split_k}")
    if launch.kind in ("skinny", "gemv", "fma", "mma", "swap"):
        return f"{launch.kind}{launch.block_n}x{launch.block_k}w{launch.num_warps}/s{launch.split_k}"
    if launch.kind == "tiled":
        return f"tiled{launch.block_m}x{launch.block_n}x{launch.block_k}"
    return launch.kind
