"""Paged attention over the KV cache, in Triton: one entry point for every step shape.

Layout. `k_cache`/`v_cache`: `[num_blocks, block_size, num_kv_heads, head_dim]` (FlashAttention's
paged layout; K and V must share strides, as views of one tensor do). Sequence b's token at
position p lives in block `block_tables[b, p // block_size]`, row `p % block_size`.

Queries. `q` is `[T, num_heads, head_dim]`; sequence b owns rows
`query_start_loc[b]:query_start_loc[b+1]` and its q_len queries are the LAST q_len positions of
its context: query i sits at position `context_lens[b] - q_len + i` and sees the keys at its own
and earlier positions. KV of this step's tokens is already in the cache (see `store_kvcache`). So a fresh
prompt, a prefill chunk, a prompt behind a prefix-cache hit and a decode token are all the same
thing: q_len new tokens at the end of a context.

Kernels.
* decode (every q_len == 1): one program per (share of a sequence's KV, KV head). The program
  handles all `num_heads / num_kv_heads` query heads of its KV head, so every KV byte is read
  once; the query group is padded to 16 rows so the scores and P@V are `tl.dot`s. Long contexts
  are split (flash-decoding) and the splits are merged by their log-sum-exp: inside the same
  launch by default (the split that finishes last merges, see `_merge_if_last`), or by a
  second kernel (`fold=False`, or TWINSERVE_DECODE_FOLD without `merge`: the A/B of
  bench_attention.py). The
  shares come either from a host work list (`engine.kernels.launch.plan_decode_work`: the
  batch's total context balanced over the GPU; what the model runner uses) or, without one, as
  `num_splits` equal shares of every sequence.
  With `query_start_loc` the decode kernel reads any step's queries: the decode half of a mixed
  step (without a work list, sequences whose q_len is not 1 are skipped). In a decode-only
  step it can also take the qkv projection's output and do q/k RMSNorm, RoPE and the K/V
  store itself (`paged_decode_attention_qkv`): a layer's attention is then one launch.
* prefill (anything else, mixed batches included): one program per (KV head, sequence, query
  tile), or programs per KV head that walk a host-built tile list: a grid fixed per CUDA graph
  size, no programs for decode rows, and the list's padding costs one read; the tile packs BLOCK_Q tokens x the query group into
  BLOCK_M rows (again sharing the KV reads), walks the KV blocks with an online softmax, masks
  only the tiles that touch the causal diagonal. Programs start heaviest first (the query
  tiles that see the most keys), so the causal triangle's long tiles do not form the tail.
  Launch geometry: engine.kernels.launch.PrefillLaunch.

Supported: fp32 / fp16 / bf16; any block_size >= 1 (tiles gather per token, so 1, 24, 16..256
all work; a block_size that is a multiple of the tile width takes a cheaper one-lookup-per-tile
path); head_dim 16..256 (powers of two 64 and 128 are the tuned ones; others are padded);
any num_heads that is a multiple of num_kv_heads. Softmax and accumulation in fp32.

CUDA graphs: `paged_decode_attention` (and `paged_attention` with max_query_len == 1) does no
host sync and allocates only tensors whose shapes follow from (B, num_heads, num_splits) or the
work list's length; pass `work` or `num_splits` explicitly when capturing so every replay uses
the captured grid. Padding rows
with `context_lens == 0` produce zeros. `paged_prefill_attention` with `tiles` is graph-safe too
(its grid is the tile list's length), which is what lets mixed steps replay a graph.
"""
import math
import os

import torch
import triton
import triton.language as tl

from engine.kernels import pdl

# The Triton interpreter (TRITON_INTERPRET=1, used by the CPU tests) multiplies the raw uint16
# bits of bf16 operands in tl.dot. Upcasting to fp32 first is exact (bf16 values and their
# products fit fp32), so on the interpreter we compute the same numbers the GPU does.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

from engine.kernels.launch import (  # noqa: E402  (launch geometry: host rules, no Triton)
    DECODE_BLOCK_N, DECODE_NUM_STAGES, DECODE_NUM_WARPS, MAX_SPLITS, PREFILL_LAUNCH, PrefillLaunch,
    choose_num_splits, prefill_tile_programs, prefill_tile_tokens)

# What a decode step's attention folds into its decode launch (TWINSERVE_DECODE_FOLD, a comma
# list, for A/B runs of whole engine steps): "merge" the split-KV merge (else a merge kernel
# follows), "qkv" q/k RMSNorm + RoPE + the K/V store of decode-only steps (else a RoPE + store
# kernel precedes: paged_decode_attention_qkv, engine.layers.attention.Attention.attend_qkv);
# default both, "none" neither.
_FOLDS = {f.strip() for f in os.environ.get("TWINSERVE_DECODE_FOLD", "merge,qkv").split(",") if f.strip()}
if _FOLDS - {"merge", "qkv", "none"} or ("none" in _FOLDS and len(_FOLDS) > 1):
    raise ValueError(f"TWINSERVE_DECODE_FOLD must be a comma list of merge and qkv, or none; got "
                     f"{os.environ.get('TWINSERVE_DECODE_FOLD')!r}")
FOLD_SPLITS = "merge" in _FOLDS       # the default of paged_decode_attention's `fold`
FOLD_QKV = "qkv" in _FOLDS


@triton.jit
def _kv_rows(block_table_ptr, tile_start, pos, pos_mask, stride_cb, stride_cs,
             BLOCK_SIZE: tl.constexpr, TILE_IN_PAGE: tl.constexpr):
    """Offsets of the cache rows holding positions `pos` (one tile), via the block table."""
    if TILE_IN_PAGE:  # the whole tile sits in one block: one block-table lookup
        block = tl.load(block_table_ptr + tile_start // BLOCK_SIZE).to(tl.int64)
    else:
        block = tl.load(block_table_ptr + pos // BLOCK_SIZE, mask=pos_mask, other=0).to(tl.int64)
    return block * stride_cb + (pos % BLOCK_SIZE) * stride_cs


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _online_softmax_step(acc, l, m, s, v, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one tile of log2-scaled scores `s` [M, N] and values `v` [N, D] into the running
    (acc, l, m). Every row of the first tile a row sees has a finite score, so m is finite
    from then on and exp2(m - m_new) never meets inf - inf."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return acc, l, m_new


@triton.jit
def _decode_row(query_start_loc_ptr, b, USE_QSL: tl.constexpr, USE_WORK: tl.constexpr):
    """(row, skip) of decode sequence b, for the decode and merge kernels alike: its query
    and output row is query_start_loc[b] with USE_QSL, else b; without a work list a
    sequence whose q_len is not 1 (a prefill row, a CUDA graph's padding row) is skipped."""
    row = b
    skip = False
    if USE_QSL:
        row = tl.load(query_start_loc_ptr + b)
        if not USE_WORK:
            skip = tl.load(query_start_loc_ptr + b + 1) - row != 1
    return row, skip


# Triton compiles a new variant for every new "specialization" of the runtime arguments:
# an int that is 1 or a multiple of 16, a pointer that is 16-byte aligned. Block-table widths,
# split counts and the pointers of sliced per-sequence arrays (a mixed step hands the decode
# and prefill kernels `context_lens[nd:]`, ...) change every step, and a compile in the middle
# of a run costs 0.5-1 s (measured on an H200). So those are never specialized.
@triton.jit(do_not_specialize=["stride_bt", "num_splits"],
            do_not_specialize_on_alignment=["block_tables_ptr", "context_lens_ptr",
                                            "query_start_loc_ptr", "work_ptr", "index_ptr",
                                            "tickets_ptr", "pos_ptr", "slot_ptr"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
    work_ptr, index_ptr, out_ptr, partial_ptr, lse_ptr, tickets_ptr,
    pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr,
    qk_scale, eps,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
    stride_ot, stride_oh, stride_pp, stride_ph, stride_lp, stride_cos, num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE_IN_PAGE: tl.constexpr, USE_WORK: tl.constexpr, USE_QSL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, PART_ELEMS: tl.constexpr = 0, PART_BYTES: tl.constexpr = 0,
    PAGES: tl.constexpr = 1, FOLD: tl.constexpr = False, MERGE_G: tl.constexpr = 1,
    MERGE_S: tl.constexpr = 1, QKV: tl.constexpr = False, QK_NORM: tl.constexpr = False,
):
    """One split of one sequence's KV for one KV head: positions [start, end).

    USE_WORK: program (i, kv_head) runs item i of the host's work list, `work[i]` = (b,
    start, end, splits of b); b < 0: nothing to do (a CUDA graph's grid covers the most
    items its size can have). Otherwise program (b, kv_head, split) takes split `split` of
    `num_splits` equal shares of b's tiles. A sequence with one split writes its normalized
    output in q's dtype; a split of a longer one writes its normalized partial output (fp32)
    at partial slot `i` (work list) or `b * num_splits + split`, and its log2-sum-exp; FOLD:
    the split of (b, kv_head) that finishes last merges them into the output
    (`_merge_if_last`, ticket counters `tickets`, with the work list `index[b]` = (first
    slot, count)); else `_merge_splits_kernel` does, launched next. num_splits is a runtime
    argument so a new count never compiles.
    QKV (with a work list and query_start_loc): q_ptr is the qkv projection's output [T, (H
    + 2 Hkv) * D] (stride_qt its row stride, stride_qh = D), and the kernel does what
    engine.kernels.fused.qk_norm_rope_store would have done first: each program normalizes
    (QK_NORM: q_norm weights qw) and rotates (RoPE at positions[row], cos/sin tables
    [max_position, D/2]) its query group, and the program whose share ends at the context's
    end does the same to the row's K of its KV head and stores K and V at slot_mapping[row]
    (-1: not stored) before it reads its tiles, the only ones that hold that position.
    USE_QSL: sequence b's query is row query_start_loc[b]; without a work list a sequence
    whose q_len is not 1 (a prefill row, or a padding row of a CUDA graph) is skipped.
    PDL (engine.kernels.pdl): the work item, query_start_loc, context_lens and the block
    table are step inputs, read before the wait; with PREFETCH the program also asks L2 for
    its share of the KV pages of its first tile (`_prefetch_pages`: a page [block_size,
    kv_heads, head_dim] is contiguous; KV head h prefetches its 1/kv_heads of it, PART_ELEMS
    elements at h * PART_ELEMS, so the programs of a work item cover the pages between them)."""
    if USE_WORK:
        slot = tl.program_id(0)
        b = tl.load(work_ptr + 4 * slot)
        if b < 0:
            return
        start = tl.load(work_ptr + 4 * slot + 1)
        end = tl.load(work_ptr + 4 * slot + 2)
        splits = tl.load(work_ptr + 4 * slot + 3)
    else:
        b = tl.program_id(0)
        split = tl.program_id(2)
        slot = b * num_splits + split
        splits = num_splits
    kv_head = tl.program_id(1)
    row, skip = _decode_row(query_start_loc_ptr, b, USE_QSL, USE_WORK)
    if skip:
        return
    if not USE_WORK:
        context_len = tl.load(context_lens_ptr + b)
        # Splits own whole tiles, sized per sequence so short sequences do not idle.
        tiles_per_split = tl.cdiv(tl.cdiv(context_len, BLOCK_N), num_splits)
        start = split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, context_len)
    if PREFETCH:
        _prefetch_pages(k_cache_ptr, v_cache_ptr, block_tables_ptr + b * stride_bt, start, end,
                        kv_head, stride_cb, BLOCK_SIZE, PART_ELEMS, PART_BYTES, BLOCK_N, PAGES, PDL)
    pdl.enter(PDL)             # q and this step's K/V come from the kernel before

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q_mask = g_mask[:, None] & d_mask[None, :]
    q_rows = q_ptr + row * stride_qt + heads[:, None] * stride_qh
    if QKV:
        position = tl.load(pos_ptr + row)
        q = _norm_rope(q_rows, d, q_mask, position, cos_ptr, sin_ptr, stride_cos, qw_ptr, eps,
                       QK_NORM, HEAD_DIM)
        if end == tl.load(context_lens_ptr + b):
            _store_new_kv(q_ptr + row * stride_qt, d, d_mask, kv_head, GROUP * tl.num_programs(1),
                          tl.num_programs(1), tl.load(slot_ptr + row), position, cos_ptr, sin_ptr,
                          stride_cos, kw_ptr, eps, k_cache_ptr, v_cache_ptr, stride_cb, stride_cs,
                          stride_ch, BLOCK_SIZE, QK_NORM, HEAD_DIM)
    else:
        q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)

    block_table_ptr = block_tables_ptr + b * stride_bt
    head_off = kv_head * stride_ch
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + n
        pos_mask = pos < end
        rows = _kv_rows(block_table_ptr, tile_start, pos, pos_mask, stride_cb, stride_cs,
                        BLOCK_SIZE, TILE_IN_PAGE)
        kv_off = head_off + rows[:, None] + d[None, :]
        kv_mask = pos_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        s = tl.where(pos_mask[None, :], s, float("-inf"))
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        acc, l, m = _online_softmax_step(acc, l, m, s, v, PRECISION, UPCAST)

    # An empty range (padding row with context 0, or a split past a short context) has l == 0.
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if splits == 1:
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(partial_ptr + slot * stride_pp + heads[:, None] * stride_ph + d[None, :], out,
                 mask=out_mask)
        lse = tl.where(l == 0.0, float("-inf"), m + tl.log2(tl.where(l == 0.0, 1.0, l)))
        tl.store(lse_ptr + slot * stride_lp + heads, lse, mask=g_mask)
        if FOLD:
            if USE_WORK:
                first = tl.load(index_ptr + 2 * b)
            else:
                first = b * num_splits
            _merge_if_last(partial_ptr, lse_ptr, out_ptr, tickets_ptr + b * tl.num_programs(1) + kv_head,
                           first, splits, row, kv_head, stride_pp, stride_ph, stride_lp, stride_ot,
                           stride_oh, GROUP, MERGE_G, MERGE_S, HEAD_DIM, HEAD_DIM_PAD)


@triton.jit
def _merge_if_last(partial_ptr, lse_ptr, out_ptr, ticket_ptr, first, splits, row, kv_head,
                   stride_pp, stride_ph, stride_lp, stride_ot, stride_oh, GROUP: tl.constexpr,
                   MERGE_G: tl.constexpr, MERGE_S: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HEAD_DIM_PAD: tl.constexpr):
    """The in-launch merge of a split sequence, for the query heads of one KV head: called by
    each of its `splits` programs right after it stored its partial (slots first .. first +
    splits - 1). Each takes a ticket from its (sequence, KV head) counter; the one that draws
    the last has every other split's partial visible (release by each, acquire by it), and
    computes what `_merge_splits_kernel` does: out = sum_s w_s * partial_s / sum_s w_s,
    w_s = 2^(lse_s - max), in split order whoever arrives last (deterministic), MERGE_S
    splits x MERGE_G heads per round trip to L2 (an online max across rounds: one round
    unless a sequence has more than MERGE_S splits). It then puts the counter back to 0 for
    the next launch (graph replays included: no memset). The loads bypass L1 (.cg): another
    program's partials may share a line with what this SM read earlier."""
    # every thread's stores are done before the counter moves (the atomic is one thread's
    # release; the barrier orders the others' stores before it)
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == splits - 1:
        tl.debug_barrier()
        g = tl.arange(0, MERGE_G)
        d = tl.arange(0, HEAD_DIM_PAD)
        sv = tl.arange(0, MERGE_S)
        heads = kv_head * GROUP + g
        g_mask = g < GROUP
        d_mask = d < HEAD_DIM
        m = tl.full([MERGE_G], float("-inf"), tl.float32)   # running max lse per head
        acc = tl.zeros([MERGE_G, HEAD_DIM_PAD], tl.float32)
        w_sum = tl.zeros([MERGE_G], tl.float32)
        for s0 in range(0, splits, MERGE_S):   # one pass: all loads of a chunk in flight at once
            s = first + s0 + sv
            mask = (s0 + sv < splits)[:, None] & g_mask[None, :]
            lse = tl.load(lse_ptr + s[:, None] * stride_lp + heads[None, :], mask=mask,
                          other=float("-inf"), cache_modifier=".cg")                # [S, G]
            partial = tl.load(partial_ptr + s[:, None, None] * stride_pp + heads[None, :, None] * stride_ph
                              + d[None, None, :], mask=mask[:, :, None] & d_mask[None, None, :],
                              other=0.0, cache_modifier=".cg")                      # [S, G, D]
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all empty so far: weights 0
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe[None, :])
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * partial, 0)
            w_sum = w_sum * alpha + tl.sum(w, 0)
            m = m_new
        out = acc / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        tl.atomic_xchg(ticket_ptr, 0)   # ready for the next launch


@triton.jit
def _norm_rope(rows, d, mask, pos, cos_ptr, sin_ptr, stride_cos, w_ptr, eps,
               QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Heads `rows[:, None] + d` ([R, HEAD_DIM_PAD], masked), RMSNorm'ed per head (QK_NORM,
    weights w) and rotated GPT-NeoX style at position `pos`, rounded to the activation dtype
    where engine.kernels.fused._rms and _rope round (the torch layers'): each element d is
    paired with d +- D/2, loaded a second time, so the head stays one [R, D] tile."""
    half = HEAD_DIM // 2
    first = d < half
    partner = tl.where(first, d + half, d - half)
    x = tl.load(rows + d[None, :], mask=mask, other=0.0)
    xp = tl.load(rows + partner[None, :], mask=mask, other=0.0)
    dt = x.dtype
    if QK_NORM:
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / HEAD_DIM + eps)
        d_mask = d < HEAD_DIM
        w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)
        x = ((xf * rstd[:, None]).to(dt).to(tl.float32) * w[None, :]).to(dt)
        xp = ((xp.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32) * wp[None, :]).to(dt)
    c_off = pos * stride_cos + d % half
    cos = tl.load(cos_ptr + c_off, mask=d < HEAD_DIM, other=0.0).to(dt).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + c_off, mask=d < HEAD_DIM, other=0.0).to(dt).to(tl.float32)[None, :]
    a = (x.to(tl.float32) * cos).to(dt).to(tl.float32)
    b = (xp.to(tl.float32) * sin).to(dt).to(tl.float32)
    return tl.where(first[None, :], a - b, a + b).to(dt)


@triton.jit
def _store_new_kv(qkv_row, d, d_mask, kv_head, num_heads, num_kv_heads, slot, pos, cos_ptr,
                  sin_ptr, stride_cos, kw_ptr, eps, k_cache_ptr, v_cache_ptr, stride_cb,
                  stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr, QK_NORM: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """K (normed, rotated) and V of KV head `kv_head` from one qkv row into the paged cache
    at `slot` (-1: nothing), visible to this program's loads that follow (the barrier)."""
    if slot >= 0:
        one = tl.arange(0, 1)
        mask = (one < 1)[:, None] & d_mask[None, :]
        k = _norm_rope(qkv_row + (num_heads + kv_head) * HEAD_DIM + one[:, None] * 0, d, mask, pos,
                       cos_ptr, sin_ptr, stride_cos, kw_ptr, eps, QK_NORM, HEAD_DIM)
        v = tl.load(qkv_row + (num_heads + num_kv_heads + kv_head) * HEAD_DIM + d, mask=d_mask, other=0.0)
        slot = slot.to(tl.int64)
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        tl.store(k_cache_ptr + dst + one[:, None] * 0 + d[None, :], k, mask=mask)
        tl.store(v_cache_ptr + dst + d, v, mask=d_mask)
    tl.debug_barrier()


@triton.jit
def _prefetch_pages(k_cache_ptr, v_cache_ptr, block_table_ptr, start, end, kv_head, stride_cb,
                    BLOCK_SIZE: tl.constexpr, PART_ELEMS: tl.constexpr, PART_BYTES: tl.constexpr,
                    TILE: tl.constexpr, PAGES: tl.constexpr, PDL: tl.constexpr):
    """L2 prefetch of KV head `kv_head`'s part of the K and V pages holding the first tile of
    [start, end): the loads the program waits on first; its pipeline keeps the later tiles
    in flight itself. (Prefetching whole shares thrashed L2 at batch 64: ~600 resident
    programs x 512 KB; one tile is <= 32 KB per program.) Pages past the tile's last: the
    last again, a harmless repeat."""
    if end > start:
        first = start // BLOCK_SIZE
        last = (tl.minimum(end, start + TILE) - 1) // BLOCK_SIZE
        pages = tl.minimum(first + tl.arange(0, PAGES), last)
        blocks = tl.load(block_table_ptr + pages).to(tl.int64)
        off = blocks * stride_cb + kv_head * PART_ELEMS
        nbytes = tl.zeros((PAGES,), dtype=tl.int32) + PART_BYTES
        pdl.prefetch_rows_l2(k_cache_ptr + off, nbytes, PDL)
        pdl.prefetch_rows_l2(v_cache_ptr + off, nbytes, PDL)


@triton.jit(do_not_specialize=["num_splits"],
            do_not_specialize_on_alignment=["query_start_loc_ptr", "index_ptr"])
def _merge_splits_kernel(
    partial_ptr, lse_ptr, out_ptr, query_start_loc_ptr, index_ptr,
    stride_pp, stride_ph, stride_lp, stride_ot, stride_oh, num_splits,
    SPLITS_PAD: tl.constexpr, USE_WORK: tl.constexpr, USE_QSL: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program (b, head): out = sum_s w_s * partial_s / sum_s w_s with w_s = 2^(lse_s - max)
    over b's partial slots: `index[b]` = (first slot, count) with a work list (count <= 1:
    nothing to merge, the split wrote the output), else slots b * num_splits + [0,
    num_splits). USE_QSL: output row query_start_loc[b] (without a work list, q_len != 1 is
    skipped as in _decode_kernel)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    if USE_WORK:   # the plan is a step input: read before the wait, so idle programs leave at once
        first = tl.load(index_ptr + 2 * b)
        count = tl.load(index_ptr + 2 * b + 1)
        if count <= 1:
            return
    pdl.enter(PDL)
    if not USE_WORK:
        first = b * num_splits
        count = num_splits
    row, skip = _decode_row(query_start_loc_ptr, b, USE_QSL, USE_WORK)
    if skip:
        return
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    s_mask = s < count
    d_mask = d < HEAD_DIM
    lse = tl.load(lse_ptr + (first + s) * stride_lp + h, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all splits empty: output 0
    w = tl.exp2(lse - lse_max)
    partial = tl.load(partial_ptr + (first + s)[:, None] * stride_pp + h * stride_ph + d[None, :],
                      mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    w_sum = tl.sum(w, 0)
    out = tl.sum(w[:, None] * partial, 0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _load_kv(ptrs, pos_mask, d_mask, MASK_POS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [BLOCK_N, HEAD_DIM_PAD] K or V tile. Masks only what can be out of range: positions
    past the end on the diagonal (MASK_POS), the padding of a head_dim that is not a power of
    two (not EVEN_D); elsewhere the load is a plain vector copy."""
    if MASK_POS:
        return tl.load(ptrs, mask=pos_mask[:, None] & d_mask[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_mask[None, :], other=0.0)


@triton.jit
def _prefill_step(acc, l, m, qk, v, qk_scale, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one tile of raw scores `qk` [M, N] (q.k, masked entries -inf) and values `v` into
    the running (acc, l, m), m in log2 units. The scale (softmax scale x log2 e, > 0) is
    folded into one multiply-add per score. The first tile a row sees holds a visible key
    (the caller's loop order), so m is finite from then on."""
    m_new = tl.maximum(m, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l, m_new


@triton.jit
def _prefill_tile(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, query_start_loc_ptr, out_ptr,
    qk_scale, stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    b, q_tile, kv_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_IN_PAGE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Query tile `q_tile` (BLOCK_Q tokens, which must hold at least one of the sequence's
    queries) of sequence b, for the query heads of `kv_head`. Row r of the tile is token
    `r // GROUP_PAD` of the tile and query head `kv_head * GROUP + r % GROUP_PAD`."""
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    context_len = tl.load(context_lens_ptr + b)
    num_cached = context_len - q_len  # KV positions before this step's first query
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD   # no head_dim padding to mask

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM_PAD)
    n = tl.arange(0, BLOCK_N)
    tok = q_tile * BLOCK_Q + r // GROUP_PAD
    g = r % GROUP_PAD
    heads = kv_head * GROUP + g
    row_mask = (tok < q_len) & (g < GROUP)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = num_cached + tok

    block_table_ptr = block_tables_ptr + b * stride_bt
    head_off = kv_head * stride_ch
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    # Keys below the tile's first query position are visible to every row: no masks there.
    # Tiles from unmasked_end to kv_end touch the diagonal: causal mask, and stop at the
    # tile's last query position. Keys past kv_end load as zeros and are visible only to
    # padding rows (tok >= q_len), whose output is never stored.
    first_q_pos = num_cached + q_tile * BLOCK_Q
    unmasked_end = (first_q_pos // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(context_len, num_cached + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q))
    for tile_start in range(0, unmasked_end, BLOCK_N):
        pos = tile_start + n
        rows = _kv_rows(block_table_ptr, tile_start, pos, pos < unmasked_end, stride_cb, stride_cs,
                        BLOCK_SIZE, TILE_IN_PAGE)
        kv_off = head_off + rows[:, None] + d[None, :]
        k = _load_kv(k_cache_ptr + kv_off, pos, d_mask, False, EVEN_D)
        qk = _dot(q, tl.trans(k), PRECISION, UPCAST)
        v = _load_kv(v_cache_ptr + kv_off, pos, d_mask, False, EVEN_D)
        acc, l, m = _prefill_step(acc, l, m, qk, v, qk_scale, PRECISION, UPCAST)
    for tile_start in range(unmasked_end, kv_end, BLOCK_N):
        pos = tile_start + n
        pos_mask = pos < kv_end
        rows = _kv_rows(block_table_ptr, tile_start, pos, pos_mask, stride_cb, stride_cs,
                        BLOCK_SIZE, TILE_IN_PAGE)
        kv_off = head_off + rows[:, None] + d[None, :]
        k = _load_kv(k_cache_ptr + kv_off, pos_mask, d_mask, True, EVEN_D)
        qk = _dot(q, tl.trans(k), PRECISION, UPCAST)
        qk = tl.where(pos[None, :] <= q_pos[:, None], qk, float("-inf"))
        v = _load_kv(v_cache_ptr + kv_off, pos_mask, d_mask, True, EVEN_D)
        acc, l, m = _prefill_step(acc, l, m, qk, v, qk_scale, PRECISION, UPCAST)

    # Every stored row saw at least its own key, so l > 0 there.
    out = acc * (1.0 / tl.where(l == 0.0, 1.0, l))[:, None]
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])




@triton.jit(do_not_specialize=["stride_bt", "num_tiles"],
            do_not_specialize_on_alignment=["block_tables_ptr", "context_lens_ptr",
                                            "query_start_loc_ptr", "tiles_ptr"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
    tiles_ptr, out_ptr, qk_scale,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh, num_tiles,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_IN_PAGE: tl.constexpr,
    USE_TILES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Without USE_TILES: program (kv_head, b, j) takes query tile `num_programs(2) - 1 - j`
    of sequence b (none if past b's query). With USE_TILES: program (kv_head, j) of G =
    num_programs(1) walks the tile list `tiles` [num_tiles, 2] = (b, query tile), real
    entries first, sorted heaviest first, ended by the first b < 0 (padding of a CUDA
    graph's list): entries j, 2G - 1 - j, 2G + j, 4G - 1 - j, ... (a snake, so every program
    gets about the same keys), so a padded list costs one read per program, not a program
    per entry. Either way the programs that start first hold the query tiles that see the
    most keys (causal): the long programs start early and short ones fill the tail."""
    kv_head = tl.program_id(0)
    if USE_TILES:
        j = tl.program_id(1)
        G = tl.num_programs(1)
        i = j
        b = tl.load(tiles_ptr + 2 * i, mask=i < num_tiles, other=-1)
        rnd = 0
        while b >= 0:
            q_tile = tl.load(tiles_ptr + 2 * i + 1)
            q_len = tl.load(query_start_loc_ptr + b + 1) - tl.load(query_start_loc_ptr + b)
            if q_tile * BLOCK_Q < q_len:   # an entry past its sequence's query does nothing
                _prefill_tile(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                              query_start_loc_ptr, out_ptr, qk_scale, stride_qt, stride_qh, stride_cb,
                              stride_cs, stride_ch, stride_bt, stride_ot, stride_oh, b, q_tile, kv_head,
                              GROUP, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_Q, BLOCK_M, BLOCK_N,
                              TILE_IN_PAGE, PRECISION, UPCAST)
            rnd += 1
            i = rnd * G + tl.where(rnd % 2 == 0, j, G - 1 - j)
            b = tl.load(tiles_ptr + 2 * i, mask=i < num_tiles, other=-1)
    else:
        b = tl.program_id(1)
        q_tile = tl.num_programs(2) - 1 - tl.program_id(2)
        q_len = tl.load(query_start_loc_ptr + b + 1) - tl.load(query_start_loc_ptr + b)
        if q_tile * BLOCK_Q < q_len:   # the grid covers the longest query of the batch
            _prefill_tile(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                          query_start_loc_ptr, out_ptr, qk_scale, stride_qt, stride_qh, stride_cb, stride_cs,
                          stride_ch, stride_bt, stride_ot, stride_oh, b, q_tile, kv_head,
                          GROUP, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_Q, BLOCK_M, BLOCK_N,
                          TILE_IN_PAGE, PRECISION, UPCAST)


def decode_signature(dtype: str = "bf16") -> dict:
    """Triton's types of `_decode_kernel`'s runtime arguments, in order, for ahead-of-time
    compiles (tests, bench_attention.py); q, the caches and out in `dtype`."""
    sig = {name: f"*{dtype}" for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr")}
    sig.update({name: "*i32" for name in ("block_tables_ptr", "context_lens_ptr", "query_start_loc_ptr",
                                          "work_ptr", "index_ptr")})
    sig.update(out_ptr=f"*{dtype}", partial_ptr="*fp32", lse_ptr="*fp32", tickets_ptr="*i32",
               pos_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", qw_ptr=f"*{dtype}", kw_ptr=f"*{dtype}",
               slot_ptr="*i64", qk_scale="fp32", eps="fp32")
    sig.update({name: "i32" for name in ("stride_qt", "stride_qh", "stride_cb", "stride_cs", "stride_ch",
                                         "stride_bt", "stride_ot", "stride_oh", "stride_pp", "stride_ph",
                                         "stride_lp", "stride_cos", "num_splits")})
    return sig


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter runs: pretend an H100 so the heuristic takes its GPU branches


def _check(q, k_cache, v_cache, block_tables, context_lens, query_start_loc=None):
    """Shape/dtype/layout checks that need no device sync. Returns (group, head_dim)."""
    if q.dim() != 3:
        raise ValueError(f"paged attention: q must be [tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged attention: k_cache/v_cache must both be [num_blocks, block_size, "
                         f"num_kv_heads, head_dim], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"paged attention: q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if not 16 <= head_dim <= 256:
        raise ValueError(f"paged attention: head_dim {head_dim} unsupported; supported 16..256")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"paged attention: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"paged attention: dtype {q.dtype} unsupported; use float32, float16 or bfloat16")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"paged attention: dtypes differ: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError(f"paged attention: q and k_cache must be contiguous in head_dim, strides "
                         f"{q.stride()} and {k_cache.stride()}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"paged attention: k_cache and v_cache must share strides, got "
                         f"{k_cache.stride()} and {v_cache.stride()}")
    batch = context_lens.shape[0] if context_lens.dim() == 1 else -1
    if context_lens.dtype != torch.int32 or batch < 0:
        raise ValueError(f"paged attention: context_lens must be int32 [B], got {context_lens.dtype} "
                         f"{tuple(context_lens.shape)}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"paged attention: block_tables must be int32 [B={batch}, max_blocks_per_seq], "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError(f"paged attention: block_tables rows must be contiguous, strides {block_tables.stride()}")
    if query_start_loc is not None and (query_start_loc.dtype != torch.int32
                                        or tuple(query_start_loc.shape) != (batch + 1,)):
        raise ValueError(f"paged attention: query_start_loc must be int32 [B+1={batch + 1}], got "
                         f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}")
    return num_heads // num_kv_heads, head_dim


def _output(q, out):
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"paged attention: out must match q ({tuple(q.shape)}, {q.dtype}, last dim "
                         f"contiguous), got {tuple(out.shape)}, {out.dtype}, strides {out.stride()}")
    return out


def _dot_flags(dtype):
    """(input_precision, upcast) for tl.dot: fp32 inputs stay exact (no TF32)."""
    upcast = _INTERPRETED and dtype == torch.bfloat16
    return ("ieee" if dtype == torch.float32 or upcast else "tf32"), upcast


def _decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, out, group, head_dim,
            query_start_loc=None, work=None, fold=None, rope=None):
    batch, num_heads = context_lens.shape[0], q.shape[1]
    block_size = k_cache.shape[1]
    precision, upcast = _dot_flags(q.dtype)
    if work is not None:
        items, index = work
        slots, grid = items.shape[0], (items.shape[0], num_heads // group)
        merge = True
    else:
        if not 1 <= num_splits <= MAX_SPLITS:
            raise ValueError(f"paged attention: num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
        items = index = context_lens  # unused
        slots, grid = batch * num_splits, (batch, num_heads // group, num_splits)
        merge = num_splits > 1
    if batch == 0 or slots == 0:
        return out
    # partial outputs and log-sum-exps of split sequences, one slot per split
    partial = torch.empty(slots if merge else 1, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(slots if merge else 1, num_heads, dtype=torch.float32, device=q.device)
    use_qsl = query_start_loc is not None
    qsl = query_start_loc if use_qsl else context_lens
    prefetch = pdl.enabled() and _pages_contiguous(k_cache, v_cache)
    fold = merge and (FOLD_SPLITS if fold is None else fold)
    num_kv_heads = num_heads // group
    tickets = _tickets(q.device, batch * num_kv_heads) if fold else context_lens   # unused unfolded
    merge_g = triton.next_power_of_2(group)
    merge_s = max(1, min(triton.next_power_of_2(MAX_SPLITS), 4096 // (merge_g * triton.next_power_of_2(head_dim))))
    # rope: (positions, cos, sin, q_norm, k_norm, eps, slot_mapping): q is the qkv output's
    # query part, normed, rotated and its K/V stored here (QKV); else unused stand-ins
    if rope is None:
        positions = cos = sin = q_norm = k_norm = slots = context_lens
        eps = 0.0
    else:
        positions, cos, sin, q_norm, k_norm, eps, slots = rope
    _decode_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, qsl, items, index, out, partial, lse, tickets,
        positions, cos, sin, q_norm if q_norm is not None else cos, k_norm if k_norm is not None else cos,
        slots, scale * math.log2(math.e), eps,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), partial.stride(0), partial.stride(1),
        lse.stride(0), cos.stride(0) if rope else 0, num_splits or 1,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        BLOCK_N=DECODE_BLOCK_N, TILE_IN_PAGE=block_size % DECODE_BLOCK_N == 0,
        USE_WORK=work is not None, USE_QSL=use_qsl, PRECISION=precision, UPCAST=upcast,
        num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES,
        PDL=pdl.enabled(), PREFETCH=prefetch, PART_ELEMS=block_size * head_dim if prefetch else 0,
        PART_BYTES=block_size * head_dim * k_cache.element_size() if prefetch else 0,
        PAGES=triton.next_power_of_2(triton.cdiv(DECODE_BLOCK_N, block_size) + 1),   # a tile's pages
        FOLD=fold, MERGE_G=merge_g, MERGE_S=merge_s, QKV=rope is not None,
        QK_NORM=rope is not None and q_norm is not None,
        **pdl.launch_kwargs(),
    )
    if merge and not fold:
        _merge_splits_kernel[(batch, num_heads)](
            partial, lse, out, qsl, index, partial.stride(0), partial.stride(1), lse.stride(0),
            out.stride(0), out.stride(1), num_splits or 1,
            SPLITS_PAD=triton.next_power_of_2(MAX_SPLITS), USE_WORK=work is not None,
            USE_QSL=use_qsl, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
            num_warps=4, PDL=pdl.enabled(), **pdl.launch_kwargs(),
        )
    return out


_TICKETS: dict[torch.device, torch.Tensor] = {}
_RETIRED: dict[torch.device, list[torch.Tensor]] = {}   # outgrown: captured graphs may still use them


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    """The folded merge's int32 ticket counters, one per (decode row, KV head), all zero
    between launches (the last split of each puts its counter back): at least `count`, grown
    (never freed: a CUDA graph keeps the address it captured) outside a capture only, since
    the zeros of a buffer made inside one would be written only when the graph first replays.
    Launches on a device must be stream-ordered (they share the counters), as the engine's
    single stream is."""
    tickets = _TICKETS.get(device)
    if tickets is None or tickets.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"paged_decode_attention: the folded split merge needs {count} ticket "
                               f"counters on {device}, more than allocated; call it once at this batch "
                               f"size before CUDA-graph capture")
        if tickets is not None:
            _RETIRED.setdefault(device, []).append(tickets)
        tickets = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _TICKETS[device] = tickets
    return tickets


def drop_buffers(device: torch.device) -> None:
    """Forget the device's ticket counters (engine.kernels.buffers: no graph uses them any more)."""
    _TICKETS.pop(device, None)
    _RETIRED.pop(device, None)


def _pages_contiguous(k_cache, v_cache) -> bool:
    """Each KV page [block_size, kv_heads, head_dim] one contiguous, 16-byte aligned range,
    its per-head parts multiples of 16 bytes: what _prefetch_pages asks of the layout."""
    _, bs, h, d = k_cache.shape
    e = k_cache.element_size()
    return (k_cache.stride()[1:] == (h * d, d, 1) and v_cache.stride() == k_cache.stride()
            and all(t.data_ptr() % 16 == 0 for t in (k_cache, v_cache))
            and k_cache.stride(0) * e % 16 == 0 and bs * d * e % 16 == 0)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                           num_splits=None, *, out=None, query_start_loc=None, work=None, fold=None,
                           _rope=None):
    """Decode: one query token per sequence. q `[B, num_heads, head_dim]`, block_tables int32
    `[B, max_blocks_per_seq]`, context_lens int32 `[B]` (0 = padding row, output zeros).
    Returns `[B, num_heads, head_dim]` in q's dtype (written into `out` when given).

    With `query_start_loc` (int32 `[B+1]`), q may be any step's queries `[T, ...]`: sequence
    b's query is row query_start_loc[b], and sequences whose q_len is not 1 are skipped (their
    rows of `out` are left alone): the decode half of a mixed step, graph-safe.

    Splits. `work` = (items int32 `[D, 4]`, index int32 `[B, 2]`) from
    `engine.kernels.launch.plan_decode_work`: the host's balanced split-KV plan for this
    step's contexts (each item a share of one sequence, b = -1 for unused items; index[b] =
    its first item and count). Only listed sequences are computed; `num_splits` is ignored;
    graph-safe (the grid is D). Without it every sequence gets `num_splits` equal shares;
    None picks the count from B, num_kv_heads and the longest context the block table can hold
    (`max_blocks_per_seq * block_size`): a shape-only choice, so capture is safe either way.

    fold: merge the splits inside the decode launch (True) or in a second kernel (False);
    None: FOLD_SPLITS (on unless TWINSERVE_DECODE_FOLD leaves out `merge`). The same numbers
    either way, up to the order of the fp32 sums. Folded launches share per-device ticket
    counters, so launches on one device must not overlap (one stream, as the engine runs them).
    """
    group, head_dim = _check(q, k_cache, v_cache, block_tables, context_lens)
    if query_start_loc is None and q.shape[0] != context_lens.shape[0]:
        raise ValueError(f"paged_decode_attention: q has {q.shape[0]} rows but context_lens has "
                         f"{context_lens.shape[0]} sequences")
    if query_start_loc is not None and (query_start_loc.dtype != torch.int32
                                        or query_start_loc.shape[0] < context_lens.shape[0] + 1):
        raise ValueError(f"paged_decode_attention: query_start_loc must be int32 [>= B+1], got "
                         f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}")
    if work is not None:
        items, index = work
        if (items.dtype != torch.int32 or items.dim() != 2 or items.shape[1] != 4
                or index.dtype != torch.int32 or index.dim() != 2 or index.shape[1] != 2
                or index.shape[0] < context_lens.shape[0]):
            raise ValueError(f"paged_decode_attention: work must be (int32 [D, 4], int32 [>= B, 2]), "
                             f"got {items.dtype} {tuple(items.shape)} and {index.dtype} {tuple(index.shape)}")
        num_splits = None
    out = _output(q, out)
    if num_splits is None and work is None:
        num_splits = choose_num_splits(context_lens.shape[0], k_cache.shape[2],
                                       block_tables.shape[1] * k_cache.shape[1], _num_sms(q.device))
    if _rope is not None and (work is None or query_start_loc is None):
        raise ValueError("paged_decode_attention_qkv needs the runner's work list and query_start_loc")
    return _decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, out, group,
                   head_dim, query_start_loc, work, fold, _rope)


def paged_decode_attention_qkv(qkv, positions, cos, sin, q_norm, k_norm, eps, num_heads, k_cache,
                               v_cache, block_tables, context_lens, slot_mapping, scale, *,
                               query_start_loc, work, out=None, fold=None):
    """engine.kernels.fused.qk_norm_rope_store followed by paged_decode_attention, in the one
    decode launch, for a step whose every sequence decodes (the model runner's decode-only
    steps: `work` and `query_start_loc` as paged_decode_attention takes them, every row of
    the batch in the plan). qkv [T, (num_heads + 2 Hkv) * D] (the qkv projection's output),
    positions int64 [T], cos / sin [max_position, D / 2] (cast to qkv's dtype, as the torch
    layer casts them), q_norm / k_norm [D] or None (no q/k RMSNorm), slot_mapping int64 [T]
    (-1: K/V not stored). Returns [T, num_heads, D] in qkv's dtype (rows of no planned
    sequence left alone); stores the rows' rotated K and V in the caches as
    qk_norm_rope_store does. The same numbers as the two calls up to the order of RMSNorm's
    fp32 sum of squares (which may move a rounding). fold: see paged_decode_attention."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if (qkv.dim() != 2 or qkv.stride(1) != 1 or head_dim % 2
            or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim):
        raise ValueError(f"paged_decode_attention_qkv: qkv must be [T, (H + 2 Hkv) * D] = "
                         f"[T, {(num_heads + 2 * num_kv_heads) * head_dim}] contiguous in its rows, D even; "
                         f"got {tuple(qkv.shape)} strides {qkv.stride()} for H={num_heads}, "
                         f"Hkv={num_kv_heads}, D={head_dim}")
    tables_ok = (cos.dtype == sin.dtype and cos.is_floating_point() and cos.dim() == 2 and cos.shape == sin.shape
                 and cos.stride() == sin.stride() and cos.shape[1] == head_dim // 2 and cos.stride(1) == 1)
    if (not tables_ok or positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64
            or positions.shape[0] < qkv.shape[0] or slot_mapping.shape[0] < qkv.shape[0]):
        raise ValueError(f"paged_decode_attention_qkv: cos/sin must be [max_position, {head_dim // 2}] "
                         f"alike (one float dtype), positions and slot_mapping int64 [>= T]; got cos {cos.dtype} "
                         f"{tuple(cos.shape)}, sin {sin.dtype} {tuple(sin.shape)}, positions "
                         f"{positions.dtype} {tuple(positions.shape)}, slot_mapping {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if (q_norm is None) != (k_norm is None) or (q_norm is not None and (
            q_norm.shape != (head_dim,) or k_norm.shape != (head_dim,))):
        raise ValueError(f"paged_decode_attention_qkv: q_norm and k_norm must both be [{head_dim}] or "
                         f"both None")
    q = qkv[:, :num_heads * head_dim].view(qkv.shape[0], num_heads, head_dim)
    if out is None:
        out = torch.empty(q.shape, dtype=qkv.dtype, device=qkv.device)
    return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=out,
                                  query_start_loc=query_start_loc, work=work, fold=fold,
                                  _rope=(positions, cos, sin, q_norm, k_norm, eps, slot_mapping))


def paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                            max_query_len, scale, *, out=None, tiles=None,
                            launch: PrefillLaunch = PREFILL_LAUNCH):
    """Any batch: fresh prompts, prefill chunks, prompts behind a prefix-cache hit, decode
    tokens, or a mix (see the module docstring for q's layout). `max_query_len` (host int) sizes
    the grid; it must be >= every q_len. `scale` must be > 0. Returns `[T, num_heads,
    head_dim]` in q's dtype.

    tiles: int32 `[P, 2]` (sequence, query tile of `prefill_tile_tokens(...)` tokens): the
    real entries first, then padding (b = -1; the first one ends the list), as
    engine.step_inputs builds it: heaviest tiles (most keys) first. Only the listed tiles run
    (max_query_len is ignored) on a grid of (num_kv_heads, prefill_tile_programs(P, ...))
    programs that walk the list: fixed per CUDA graph size, no programs for the decode rows
    of a mixed step, and a padded list costs one read per program.
    launch: the kernel's tile geometry (engine.kernels.launch.PrefillLaunch); a tile list
    must be built with the same one (`prefill_tile_tokens(..., launch=launch)`)."""
    group, head_dim = _check(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    if not scale > 0:
        raise ValueError(f"paged attention: scale must be > 0, got {scale}")
    out = _output(q, out)
    batch = context_lens.shape[0]
    num_kv_heads = q.shape[1] // group
    if tiles is not None:
        if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 2:
            raise ValueError(f"paged attention: tiles must be int32 [P, 2], got {tiles.dtype} {tuple(tiles.shape)}")
        block_q = prefill_tile_tokens(q.shape[1], num_kv_heads, q.dtype, launch=launch)
        grid = (num_kv_heads, prefill_tile_programs(tiles.shape[0], num_kv_heads, _num_sms(q.device), launch))
        if tiles.shape[0] == 0 or batch == 0:
            return out
    else:
        if batch == 0 or max_query_len <= 0 or q.shape[0] == 0:
            return out
        block_q = prefill_tile_tokens(q.shape[1], num_kv_heads, q.dtype, max_query_len, launch=launch)
        grid = (num_kv_heads, batch, triton.cdiv(max_query_len, block_q))
    block_size = k_cache.shape[1]
    group_pad = triton.next_power_of_2(group)
    block_n = launch.block_n if q.dtype != torch.float32 else max(16, launch.block_n // 2)
    precision, upcast = _dot_flags(q.dtype)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
        tiles if tiles is not None else query_start_loc, out,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), tiles.shape[0] if tiles is not None else 0,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_M=block_q * group_pad, BLOCK_N=block_n,
        TILE_IN_PAGE=block_size % block_n == 0, USE_TILES=tiles is not None,
        PRECISION=precision, UPCAST=upcast,
        num_warps=launch.num_warps if block_q * group_pad >= 128 else min(4, launch.num_warps),
        num_stages=launch.num_stages,
    )
    return out


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                    max_query_len, max_context_len, scale, num_splits=None, *, out=None, fold=None):
    """The engine's attention call for any step (see the module docstring for the layout).

    Dispatch: when every sequence has exactly one query (`max_query_len == 1` and
    `q.shape[0] == B`) the split-KV decode kernel runs, with `num_splits` (None: chosen from
    B, num_kv_heads and `max_context_len`); otherwise the prefill kernel handles the whole batch
    and `num_splits` is ignored. `max_query_len` and `max_context_len` are host ints, upper
    bounds of the batch's q_len and context_len. `fold`: see paged_decode_attention. Returns
    `[T, num_heads, head_dim]` in q's dtype.
    """
    if max_query_len == 1 and q.dim() == 3 and q.shape[0] == context_lens.shape[0]:
        group, head_dim = _check(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
        out = _output(q, out)
        if num_splits is None:
            num_splits = choose_num_splits(q.shape[0], k_cache.shape[2], max_context_len, _num_sms(q.device))
        return _decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, out, group,
                       head_dim, fold=fold)
    return paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                   max_query_len, scale, out=out)
