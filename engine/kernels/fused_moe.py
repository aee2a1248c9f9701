"""Fused mixture-of-experts in Triton: route, sort the (token, expert) pairs by expert, one
grouped GEMM per projection over the stacked expert weights, sum each token's k outputs.

    route+align  per token tile: softmax over the experts (fp32), top-k, renormalize; the
                 pairs sorted by expert, each expert's run padded to a multiple of BLOCK_M
                 rows, so every row block belongs to one expert (1 launch when one program
                 holds all tokens, else 2: per-tile expert counts, then the scatter)
    gate_up      per row block: x[tokens] @ w13[e]^T, silu(gate) * up  -> h [T*k, I]
    down         per row block: h[pairs] @ w2[e]^T * routing weight    -> y [T*k, H]
    sum          out[t] = sum over slots of y[t*k + slot], in slot order, fp32 (no atomics:
                 deterministic)

So an MoE layer is the router GEMM plus 4-5 launches (the torch version: ~20).
Capture-safe: every shape and grid depends only on T, k, E and the tiles (row blocks are
bounded by min(E, T*k) + T*k / BLOCK_M); blocks past the used ones exit at once, reading
their expert id (E = none) from device memory. No host synchronization.

Routing contract (`route_align`): the ids are the k largest softmax probabilities, in
descending order, ties to the lower expert index; the weights are those probabilities
(divided by their sum when renormalizing), computed as engine.layers.moe.route does. Where no
two of a token's top k+1 probabilities tie, the ids equal route's and the weights agree to
float32 rounding (exp and sums in another order). torch.topk orders ties in an
implementation-defined way (CPU and CUDA differ), so under exact ties the ids may differ from
route's, and a tie at the k-th place may select another (equally weighted) expert. The pairs
within an expert are in pair order (t * k + slot), exactly as align_by_expert sorts them.

Tiles: `MoeTiles` (rows per block, and per GEMM the N/K tile, warps, stages). A layer's
`moe_tiles` plan (set by `choose_moe_tiles` after loading: timed candidates per token-count
bucket under CUDA graphs, on the real expert weights) picks them; a call of T tokens takes
the bucket nearest T (log scale); without a plan, `default_tiles`.
"""
import math
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

BLOCK_M = 16                 # rows per block for decode-sized batches (default rule)
BLOCK_M_LARGE = 64           # ... once there are this many pairs per expert on average
ROUTE_TILE = 8192            # elements of a routing program's [tokens, experts] tile
# The Triton interpreter (CPU tests) multiplies the raw bits of bf16 operands in tl.dot;
# there the operands are upcast to fp32 first, which is exact (as engine.kernels.paged_attention)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Tiles:
    """Launch constants of one grouped GEMM (the defaults: the untuned choice)."""
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoeTiles:
    """Rows per block (shared by the alignment and both GEMMs) and each GEMM's tiles."""
    block_m: int = BLOCK_M
    gate_up: Tiles = field(default_factory=Tiles)
    down: Tiles = field(default_factory=Tiles)


def default_tiles(num_pairs: int, num_experts: int) -> MoeTiles:
    """16-row blocks (decode: few pairs per expert, little padding), 64 once experts average
    64 pairs (full-width tensor-core tiles); 64x64 GEMM tiles."""
    return MoeTiles(BLOCK_M_LARGE if num_pairs >= BLOCK_M_LARGE * num_experts else BLOCK_M)


def tiles_for(plan, num_tokens: int, num_pairs: int, num_experts: int) -> MoeTiles:
    """The tiles of a call: plan ((tokens, MoeTiles), ...) ascending -> the entry whose token
    count is nearest num_tokens in log scale (the smaller on a tie); no plan: default_tiles."""
    if not plan:
        return default_tiles(num_pairs, num_experts)
    return min(plan, key=lambda entry: abs(math.log2(entry[0] / num_tokens)))[1]


def max_row_blocks(num_pairs: int, num_experts: int, block_m: int = BLOCK_M) -> int:
    """An upper bound on the row blocks of any routing: each used expert pads at most one
    partial block."""
    return min(num_experts, num_pairs) + triton.cdiv(num_pairs, block_m)


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """ids [T, k] -> (sorted_pairs int32 [R*block_m]: pair index t*k + slot, or T*k for a
    padding row; block_expert int32 [R]: the expert of each row block, num_experts = unused),
    R = max_row_blocks. The torch reference of the alignment kernels (~12 device ops)."""
    flat = ids.reshape(-1).long()
    n = flat.numel()
    num_blocks = max_row_blocks(n, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    first_row = (block_end - blocks) * block_m                   # each expert's first row
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    rank = torch.arange(n, device=ids.device) - (torch.cumsum(counts, 0) - counts)[experts]
    sorted_pairs = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=ids.device)
    sorted_pairs[first_row[experts] + rank] = order.to(torch.int32)
    block_expert = torch.searchsorted(block_end, torch.arange(num_blocks, device=ids.device),
                                      right=True).to(torch.int32)
    return sorted_pairs, block_expert


# ---- routing and alignment ---------------------------------------------------------------

@triton.jit
def _top_k(logits, offs_e, num_experts, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
           E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, RENORMALIZE: tl.constexpr):
    """logits [BT, E_PAD] fp32 -> (ids [BT, K_PAD] int32, weights [BT, K_PAD] fp32): softmax,
    the TOP_K largest probabilities (ties: lower index first), renormalized if asked."""
    m = tl.max(logits, 1)
    e = tl.exp(logits - m[:, None])
    p = e / tl.sum(e, 1)[:, None]
    p = tl.where(offs_e[None, :] < num_experts, p, -1.0)         # padding: never chosen
    slots = tl.arange(0, K_PAD)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    weights = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, 1)
        idx = tl.min(tl.where(p == best[:, None], offs_e[None, :], E_PAD), 1)
        idx = tl.minimum(idx, num_experts - 1)                    # a NaN row: stay in range
        ids = tl.where(slots[None, :] == j, idx[:, None], ids)
        weights = tl.where(slots[None, :] == j, best[:, None], weights)
        p = tl.where(offs_e[None, :] == idx[:, None], -2.0, p)    # taken
    if RENORMALIZE:
        weights = weights / tl.sum(weights, 1)[:, None]           # padding slots hold 0
    return ids, weights


@triton.jit
def _slot(ids, slots, s):
    """Column s of ids [BT, K_PAD] -> [BT]."""
    return tl.sum(tl.where(slots[None, :] == s, ids, 0), 1)


@triton.jit
def _token_counts(ids, valid_t, offs_e, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                  E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """h [BT, E_PAD] int32: how many of token t's slots chose expert e (0 for t past T)."""
    slots = tl.arange(0, K_PAD)
    h = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32)
    for s in tl.static_range(TOP_K):
        h += ((_slot(ids, slots, s)[:, None] == offs_e[None, :]) & valid_t[:, None]).to(tl.int32)
    return h


@triton.jit
def _align_tile(ids, valid_t, offs_t, h, total, before, pairs_ptr, block_expert_ptr,
                pid, num_programs, num_pairs, num_experts, num_blocks,
                TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """Write this tile's pairs at their sorted rows, and this program's share of the row
    blocks: their experts and padding rows. total [E_PAD]: pairs per expert over all tiles;
    before [E_PAD]: ... over earlier tiles; h: this tile's per-token counts."""
    offs_e = tl.arange(0, E_PAD)
    blocks = (total + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)
    first_row = (block_end - blocks) * BLOCK_M
    # a pair's row: its expert's first row + pairs of that expert in earlier tiles, earlier
    # tokens of this tile, earlier slots of its token (= a stable sort by expert)
    row = (first_row + before)[None, :] + tl.cumsum(h, 0) - h
    slots = tl.arange(0, K_PAD)
    for s in tl.static_range(TOP_K):
        hit = (_slot(ids, slots, s)[:, None] == offs_e[None, :]) & valid_t[:, None]
        tl.store(pairs_ptr + tl.sum(tl.where(hit, row, 0), 1), offs_t * TOP_K + s, mask=valid_t)
        row += hit.to(tl.int32)
    # row blocks [lo, hi) of this program: expert = how many experts' blocks end at or before
    rows = tl.arange(0, BLOCK_M)
    per = tl.cdiv(num_blocks, num_programs)
    lo = pid * per
    hi = tl.minimum(lo + per, num_blocks)
    for b0 in range(lo, hi, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        ended = (block_end[None, :] <= bs[:, None]) & (offs_e[None, :] < num_experts)
        expert = tl.sum(ended.to(tl.int32), 1)
        tl.store(block_expert_ptr + bs, expert, mask=bs < hi)
        own = offs_e[None, :] == expert[:, None]
        start = tl.sum(tl.where(own, first_row[None, :], 0), 1)
        count = tl.sum(tl.where(own, total[None, :], 0), 1)
        at = bs[:, None] * BLOCK_M + rows[None, :]
        pad = (expert[:, None] >= num_experts) | (at - start[:, None] >= count[:, None])
        tl.store(pairs_ptr + at, tl.zeros_like(at) + num_pairs, mask=pad & (bs < hi)[:, None])


# token and block counts vary by step: not specialized (a variant compiled mid-run stalls it)
@triton.jit(do_not_specialize=["num_tokens", "num_blocks"])
def _route_kernel(logits_ptr, ids_ptr, weights_ptr, counts_ptr, pairs_ptr, block_expert_ptr,
                  num_tokens, num_experts, num_blocks, stride_lt,
                  TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
                  ROUTE: tl.constexpr, RENORMALIZE: tl.constexpr, SINGLE: tl.constexpr):
    """Per tile of BLOCK_T tokens: route (ROUTE; else read the given ids) and count pairs per
    expert; SINGLE (one tile holds every token): align too, else store the counts for
    _align_kernel."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    valid_t = offs_t < num_tokens
    offs_e = tl.arange(0, E_PAD)
    slots = tl.arange(0, K_PAD)
    at = offs_t[:, None] * TOP_K + slots[None, :]
    in_tile = valid_t[:, None] & (slots[None, :] < TOP_K)
    if ROUTE:
        logits = tl.load(logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :],
                         mask=valid_t[:, None] & (offs_e[None, :] < num_experts),
                         other=float("-inf")).to(tl.float32)
        logits = tl.where(valid_t[:, None], logits, 0.0)   # rows past T: finite junk
        ids, weights = _top_k(logits, offs_e, num_experts, TOP_K, K_PAD, E_PAD, BLOCK_T,
                                 RENORMALIZE)
        tl.store(ids_ptr + at, ids, mask=in_tile)
        tl.store(weights_ptr + at, weights, mask=in_tile)
    else:
        ids = tl.load(ids_ptr + at, mask=in_tile, other=0).to(tl.int32)
    h = _token_counts(ids, valid_t, offs_e, TOP_K, K_PAD, E_PAD, BLOCK_T)
    counts = tl.sum(h, 0)
    if SINGLE:
        _align_tile(ids, valid_t, offs_t, h, counts, tl.zeros_like(counts), pairs_ptr,
                    block_expert_ptr, 0, 1, num_tokens * TOP_K, num_experts, num_blocks,
                    TOP_K, K_PAD, E_PAD, BLOCK_M, BLOCK_B)
    else:
        tl.store(counts_ptr + pid * E_PAD + offs_e, counts)


@triton.jit(do_not_specialize=["num_tokens", "num_blocks"])
def _align_kernel(ids_ptr, counts_ptr, pairs_ptr, block_expert_ptr,
                  num_tokens, num_experts, num_blocks,
                  TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    """Per tile (as _route_kernel's): sum every tile's counts, then scatter and mark blocks."""
    pid, num_programs = tl.program_id(0), tl.num_programs(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    valid_t = offs_t < num_tokens
    offs_e = tl.arange(0, E_PAD)
    slots = tl.arange(0, K_PAD)
    ids = tl.load(ids_ptr + offs_t[:, None] * TOP_K + slots[None, :],
                  mask=valid_t[:, None] & (slots[None, :] < TOP_K), other=0).to(tl.int32)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for p0 in range(0, num_programs, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        c = tl.load(counts_ptr + ps[:, None] * E_PAD + offs_e[None, :],
                    mask=(ps < num_programs)[:, None], other=0)
        total += tl.sum(c, 0)
        before += tl.sum(tl.where((ps < pid)[:, None], c, 0), 0)
    h = _token_counts(ids, valid_t, offs_e, TOP_K, K_PAD, E_PAD, BLOCK_T)
    _align_tile(ids, valid_t, offs_t, h, total, before, pairs_ptr, block_expert_ptr,
                pid, num_programs, num_tokens * TOP_K, num_experts, num_blocks,
                TOP_K, K_PAD, E_PAD, BLOCK_M, BLOCK_B)


def _route_and_align(logits, ids, num_tokens: int, top_k: int, num_experts: int,
                     renormalize: bool, block_m: int):
    """The launches behind route_align / align (logits None: ids given)."""
    device = (logits if logits is not None else ids).device
    e_pad = triton.next_power_of_2(num_experts)
    k_pad = triton.next_power_of_2(top_k)
    block_t = min(triton.next_power_of_2(num_tokens), max(1, ROUTE_TILE // e_pad))
    programs = triton.cdiv(num_tokens, block_t)
    num_pairs = num_tokens * top_k
    num_blocks = max_row_blocks(num_pairs, num_experts, block_m)
    pairs = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    weights = None
    if logits is not None:
        ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
        weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    else:
        ids = ids.contiguous()
    counts = torch.empty(programs, e_pad, dtype=torch.int32, device=device)
    const = dict(TOP_K=top_k, K_PAD=k_pad, E_PAD=e_pad, BLOCK_T=block_t, BLOCK_M=block_m,
                 BLOCK_B=max(1, min(64, ROUTE_TILE // e_pad)))
    _route_kernel[(programs,)](
        ids if logits is None else logits, ids, ids if weights is None else weights, counts,
        pairs, block_expert, num_tokens, num_experts, num_blocks,
        0 if logits is None else logits.stride(0), ROUTE=logits is not None,
        RENORMALIZE=renormalize, SINGLE=programs == 1, num_warps=8, **const)
    if programs > 1:
        _align_kernel[(programs,)](ids, counts, pairs, block_expert, num_tokens, num_experts,
                                   num_blocks, BLOCK_P=max(1, ROUTE_TILE // e_pad // 4),
                                   num_warps=8, **const)
    return weights, ids, pairs, block_expert


def route_align(logits: torch.Tensor, top_k: int, renormalize: bool, block_m: int = BLOCK_M):
    """logits [T, E] (any float dtype) -> (weights [T, k] float32, ids [T, k] int32,
    sorted_pairs, block_expert as align_by_expert): route (module docstring: the contract)
    and align in one or two launches."""
    num_tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts} (the experts), got {top_k}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _route_and_align(logits, None, num_tokens, top_k, num_experts, renormalize, block_m)


def align(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """align_by_expert's contract (ids [T, k] in [0, num_experts)) in one or two launches."""
    num_tokens, top_k = ids.shape
    return _route_and_align(None, ids, num_tokens, top_k, num_experts, False, block_m)[2:]


# ---- the grouped GEMMs and the sum -------------------------------------------------------

@triton.jit
def _rounded(v, dtype: tl.constexpr, RTNE: tl.constexpr):
    """fp32 v -> dtype. RTNE: round to nearest even by hand first (the interpreter truncates
    fp32 to bf16; a GPU rounds), so CPU tests see the GPU's rounding."""
    if RTNE:
        bits = v.to(tl.uint32, bitcast=True)
        v = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, pairs_ptr, block_expert_ptr,
                    num_pairs, top_k, hidden, inter, num_experts,
                    stride_xt, stride_we, stride_wn, stride_wk, stride_ht,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """h[pair, n] = silu(x[tok] . w13[e, n]) * (x[tok] . w13[e, inter + n])."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:
        return
    pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    tokens = pairs // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w = w_ptr + expert.to(tl.int64) * stride_we
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_xt + ks[None, :],
                    mask=valid[:, None] & (ks[None, :] < hidden), other=0.0)
        wmask = (ks[:, None] < hidden) & (offs_n[None, :] < inter)
        wg = tl.load(w + offs_n[None, :] * stride_wn + ks[:, None] * stride_wk, mask=wmask,
                     other=0.0)
        wu = tl.load(w + (inter + offs_n[None, :]) * stride_wn + ks[:, None] * stride_wk,
                     mask=wmask, other=0.0)
        if UPCAST:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        gate = tl.dot(a, wg, gate, input_precision=PRECISION)
        up = tl.dot(a, wu, up, input_precision=PRECISION)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + pairs[:, None].to(tl.int64) * stride_ht + offs_n[None, :],
             _rounded(h, h_ptr.dtype.element_ty, UPCAST),
             mask=valid[:, None] & (offs_n[None, :] < inter))


@triton.jit(do_not_specialize=["num_pairs"])
def _down_kernel(h_ptr, w_ptr, y_ptr, weights_ptr, pairs_ptr, block_expert_ptr,
                 num_pairs, hidden, inter, num_experts,
                 stride_ht, stride_we, stride_wn, stride_wk, stride_yt,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """y[pair, n] = weight[pair] * (h[pair] . w2[e, n])."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:
        return
    pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(h_ptr + pairs[:, None].to(tl.int64) * stride_ht + ks[None, :],
                    mask=valid[:, None] & (ks[None, :] < inter), other=0.0)
        b = tl.load(w + offs_n[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=(ks[:, None] < inter) & (offs_n[None, :] < hidden), other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    # the product in the activations' dtype first, as transformers rounds it
    y = _rounded(acc, y_ptr.dtype.element_ty, UPCAST)
    weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
    y = _rounded(y.to(tl.float32) * weight[:, None], y_ptr.dtype.element_ty, UPCAST)
    tl.store(y_ptr + pairs[:, None].to(tl.int64) * stride_yt + offs_n[None, :], y,
             mask=valid[:, None] & (offs_n[None, :] < hidden))


@triton.jit
def _sum_slots_kernel(y_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
                      RTNE: tl.constexpr):
    """out[t] = sum over slots of y[t * TOP_K + slot], fp32, in slot order."""
    t, pid_h = tl.program_id(0), tl.program_id(1)
    offs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    row = y_ptr + t.to(tl.int64) * TOP_K * hidden + offs
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s in tl.static_range(TOP_K):
        acc += tl.load(row + s * hidden, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * hidden + offs, _rounded(acc, out_ptr.dtype.element_ty, RTNE),
             mask=mask)


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    upcast = _INTERPRETED and dtype == torch.bfloat16
    # fp32 stays fp32 (Triton's default for fp32 operands on a GPU is TF32: a 1e-3 error that
    # flipped a near-tie greedy token of Mixtral in check_moe_gpu)
    return upcast, "ieee" if dtype == torch.float32 or upcast else "tf32"


def gate_up(x, w13, pairs, block_expert, top_k: int, block_m: int, tiles: Tiles) -> torch.Tensor:
    """h [T*k, I]: silu(gate) * up of every pair (rows of unused pairs untouched)."""
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    h = torch.empty(x.shape[0] * top_k, inter, dtype=x.dtype, device=x.device)
    upcast, precision = _precision(x.dtype)
    _gate_up_kernel[(triton.cdiv(inter, tiles.block_n), block_expert.numel())](
        x, w13, h, pairs, block_expert, h.shape[0], top_k, hidden, inter, num_experts,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, UPCAST=upcast,
        PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return h


def down(h, w2, flat_weights, pairs, block_expert, block_m: int, tiles: Tiles) -> torch.Tensor:
    """y [T*k, H]: each pair's expert output times its routing weight."""
    num_experts, hidden, inter = w2.shape
    y = torch.empty(h.shape[0], hidden, dtype=h.dtype, device=h.device)
    upcast, precision = _precision(h.dtype)
    _down_kernel[(triton.cdiv(hidden, tiles.block_n), block_expert.numel())](
        h, w2, y, flat_weights, pairs, block_expert, h.shape[0], hidden, inter, num_experts,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, UPCAST=upcast,
        PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return y


def sum_slots(y: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """y [T*k, H] -> [T, H]: y.view(T, k, H).float().sum(1).to(y.dtype) in one launch."""
    hidden = y.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _sum_slots_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, out, hidden, TOP_K=top_k, BLOCK_H=block_h, RTNE=_precision(y.dtype)[0])
    return out


def _check(x, w13, w2):
    num_experts, two_inter, hidden = w13.shape
    if w2.shape != (num_experts, hidden, two_inter // 2) or x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"fused_moe shapes disagree: x {tuple(x.shape)}, w13 "
                         f"{tuple(w13.shape)}, w2 {tuple(w2.shape)}")


def _experts(x, w13, w2, flat_weights, pairs, block_expert, top_k, tiles: MoeTiles):
    h = gate_up(x, w13, pairs, block_expert, top_k, tiles.block_m, tiles.gate_up)
    y = down(h, w2, flat_weights, pairs, block_expert, tiles.block_m, tiles.down)
    return sum_slots(y, x.shape[0], top_k)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, tiles: MoeTiles | None = None) -> torch.Tensor:
    """The same contract as engine.layers.moe.moe_reference, routing given: x [T, H],
    w13 [E, 2I, H], w2 [E, H, I], weights [T, k] (float32), ids [T, k] in [0, E) -> [T, H]
    in x's dtype. tiles: None = default_tiles."""
    _check(x, w13, w2)
    (num_tokens, top_k), num_experts = ids.shape, w13.shape[0]
    if num_tokens == 0:
        return x.new_zeros(x.shape)
    tiles = tiles or default_tiles(num_tokens * top_k, num_experts)
    pairs, block_expert = align(ids, num_experts, tiles.block_m)
    flat_weights = weights.reshape(-1).float().contiguous()
    return _experts(x.contiguous(), w13, w2, flat_weights, pairs, block_expert, top_k, tiles)


def fused_experts(x: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  top_k: int, renormalize: bool, plan=None) -> torch.Tensor:
    """The whole MoE layer after the router GEMM: route (route_align's contract) and run the
    experts. x [T, H], logits [T, E] -> [T, H] in x's dtype. plan: a layer's `moe_tiles`
    (tiles_for picks the entry), None = default_tiles."""
    _check(x, w13, w2)
    num_tokens, num_experts = logits.shape
    if num_tokens == 0:
        return x.new_zeros(x.shape)
    tiles = tiles_for(plan, num_tokens, num_tokens * top_k, num_experts)
    weights, _, pairs, block_expert = route_align(logits, top_k, renormalize, tiles.block_m)
    return _experts(x.contiguous(), w13, w2, weights.view(-1), pairs, block_expert, top_k, tiles)


# ---- the load-time choice of tiles -------------------------------------------------------

TUNED_LAYERS = 4   # layers per timed graph: their experts outweigh the L2, as in a step
SMALL_TILES = (Tiles(), Tiles(32, 128, 4, 4), Tiles(64, 128, 4, 4), Tiles(128, 64, 4, 3),
               Tiles(16, 256, 4, 4))                  # row blocks of 16 or 32 (decode)
LARGE_TILES = (Tiles(), Tiles(128, 64, 8, 3), Tiles(64, 128, 4, 3), Tiles(128, 128, 8, 3))


def bucket_sizes(max_tokens: int) -> list[int]:
    """Token counts whose tiles choose_moe_tiles measures: powers of 2 up to 1024, then of 4,
    then max_tokens."""
    sizes, t = [], 1
    while t < max_tokens:
        sizes.append(t)
        t *= 2 if t < 1024 else 4
    return sizes + [max_tokens]


def tile_candidates(num_pairs: int, num_experts: int) -> list[tuple[int, tuple[Tiles, ...]]]:
    """(rows per block, GEMM tiles to time) for a call of num_pairs pairs: the default rule's
    rows per block and up to three heights near the pairs per expert, each with the default
    tiles first."""
    per_expert = num_pairs / num_experts
    heights = [16] + [m for m in (32, 64, 128) if per_expert >= m / 2]
    heights = set(heights[-3:]) | {default_tiles(num_pairs, num_experts).block_m}
    return [(m, SMALL_TILES if m <= 32 else LARGE_TILES) for m in sorted(heights)]


def moe_layers(model: torch.nn.Module, device_type: str = "cuda") -> dict[tuple, list]:
    """(w13 shape, w2 shape, dtype, top_k) -> the fused MoE layers of that shape (modules
    with a `moe_tiles` plan slot and `fused` set) whose experts are bf16 / fp16 on
    `device_type` (fp32 keeps the default tiles)."""
    groups: dict[tuple, list] = {}
    for module in model.modules():
        if not (hasattr(module, "moe_tiles") and getattr(module, "fused", False)):
            continue
        w13 = module.w13
        if w13.device.type != device_type or w13.dtype not in (torch.bfloat16, torch.float16):
            continue
        key = (tuple(w13.shape), tuple(module.w2.shape), w13.dtype, module.top_k)
        groups.setdefault(key, []).append(module)
    return groups


def _best(timed):
    """The fastest (us, tiles) of timed candidates (None where a candidate did not fit)."""
    return min((r for r in timed if r[0] is not None), key=lambda r: r[0])


@torch.inference_mode()
def choose_moe_tiles(model: torch.nn.Module, max_tokens: int, repeats: int = 5,
                     device_type: str = "cuda", time_us=None) -> list[dict]:
    """Per MoE layer shape and token-count bucket (bucket_sizes(max_tokens)), time the
    tile_candidates of the gate_up and down kernels under CUDA graphs, each graph one pass
    over up to TUNED_LAYERS layers of the shape (real expert weights, from HBM as in a step;
    routing drawn uniformly at random), keep per rows-per-block the fastest tiles of each
    kernel and per bucket the fastest rows-per-block, and set each layer's `moe_tiles`:
    ((tokens, MoeTiles), ...) ascending, which fused_experts follows (tiles_for). Call once
    after loading, before graph capture (it also compiles every variant a call can select).
    Returns one row per (shape, bucket): default and chosen microseconds per layer.
    device_type, time_us (fn -> microseconds of one fn() call): for tests on the CPU."""
    if time_us is None:
        from engine.kernels.skinny_gemm import graph_time_us
        time_us = lambda fn: graph_time_us(fn, repeats)   # noqa: E731
    report = []
    for (w13_shape, _, dtype, top_k), layers in moe_layers(model, device_type).items():
        num_experts, _, hidden = w13_shape
        timed_layers = layers[:TUNED_LAYERS]
        device = layers[0].w13.device
        gen = torch.Generator(device).manual_seed(num_experts + hidden)
        plan = []
        for tokens in bucket_sizes(max_tokens):
            x = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
            scores = torch.rand(tokens, num_experts, device=device, generator=gen)
            top, ids = scores.topk(top_k, dim=-1)
            flat_weights = torch.softmax(top, -1).reshape(-1).contiguous()
            per_layer = lambda fn: time_us(lambda: [fn(m) for m in timed_layers]) / len(timed_layers)  # noqa: E731
            options = []
            for block_m, tile_list in tile_candidates(tokens * top_k, num_experts):
                pairs, blocks = align(ids, num_experts, block_m)
                h = gate_up(x, layers[0].w13, pairs, blocks, top_k, block_m, Tiles())
                up = [(_timed(per_layer, lambda m, t=t: gate_up(x, m.w13, pairs, blocks, top_k,
                                                                 block_m, t)), t) for t in tile_list]
                dn = [(_timed(per_layer, lambda m, t=t: down(h, m.w2, flat_weights, pairs,
                                                              blocks, block_m, t)), t) for t in tile_list]
                options.append((block_m, up, dn))
            default = default_tiles(tokens * top_k, num_experts)
            default_us = sum(r[0] for block_m, up, dn in options if block_m == default.block_m
                             for r in (up[0], dn[0]))
            chosen_us, chosen = min(((_best(up)[0] + _best(dn)[0],
                                      MoeTiles(block_m, _best(up)[1], _best(dn)[1]))
                                     for block_m, up, dn in options), key=lambda r: r[0])
            plan.append((tokens, chosen))
            report.append(dict(w13=list(w13_shape), dtype=str(dtype).removeprefix("torch."),
                               layers=len(layers), tokens=tokens, block_m=chosen.block_m,
                               gate_up=_tiles_str(chosen.gate_up), down=_tiles_str(chosen.down),
                               default_us=default_us, chosen_us=chosen_us))
        for layer in layers:
            layer.moe_tiles = tuple(plan)
    return report


def _timed(per_layer, fn):
    """per_layer(fn), or None where the tiles do not fit the device (shared memory)."""
    try:
        return per_layer(fn)
    except triton.runtime.errors.OutOfResources:
        return None


def _tiles_str(t: Tiles) -> str:
    return f"{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}"
