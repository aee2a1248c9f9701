"""The paged prefill attention kernel as it was before the prefill rewrite (engine commit
93476b2: program order light tiles first, scale applied per score, launch BLOCK_M 128, BLOCK_N
64, 8 warps, 2 stages), kept verbatim so `benchmarks/bench_attention.py --stages prefill` times
the old kernel side by side with the engine's on the same inputs. Not used by the engine.
"""
import math

import torch
import triton
import triton.language as tl

from engine.kernels.launch import next_power_of_2
from engine.kernels.paged_attention import _check, _dot, _dot_flags, _kv_rows, _online_softmax_step, _output

PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_NUM_WARPS, PREFILL_NUM_STAGES = 128, 64, 8, 2


def prefill_tile_tokens(num_heads, num_kv_heads, dtype, max_query_len=None):
    """engine.kernels.launch.prefill_tile_tokens as of 93476b2 (BLOCK_M 128)."""
    group_pad = next_power_of_2(num_heads // num_kv_heads)
    short_q = -(-16 // group_pad)
    if max_query_len is not None and max_query_len <= short_q:
        return short_q
    block_q = max(PREFILL_BLOCK_M // group_pad, short_q)
    if dtype == torch.float32:
        block_q = max(block_q // 2, short_q)
    return block_q


@triton.jit(do_not_specialize=["stride_bt"],
            do_not_specialize_on_alignment=["block_tables_ptr", "context_lens_ptr",
                                            "query_start_loc_ptr", "tiles_ptr"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
    tiles_ptr, out_ptr, qk_scale,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_IN_PAGE: tl.constexpr,
    USE_TILES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (query tile, b, kv_head), or with USE_TILES program (i, kv_head) takes its
    (b, query tile) from the tile list `tiles[i]` (b < 0: nothing to do; a CUDA graph's
    grid covers the most tiles its size can have). Row r of the tile is token
    `r // GROUP_PAD` of the tile and query head `kv_head * GROUP + r % GROUP_PAD`."""
    if USE_TILES:
        b = tl.load(tiles_ptr + 2 * tl.program_id(0))
        if b < 0:
            return
        q_tile = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
        kv_head = tl.program_id(1)
    else:
        q_tile = tl.program_id(0)
        b = tl.program_id(1)
        kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:  # the grid covers the longest query of the batch
        return
    context_len = tl.load(context_lens_ptr + b)
    num_cached = context_len - q_len  # KV positions before this step's first query

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
    q_pos = num_cached + tok

    block_table_ptr = block_tables_ptr + b * stride_bt
    head_off = kv_head * stride_ch
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    # Keys below the tile's first query position are visible to every row: no masks there.
    first_q_pos = num_cached + q_tile * BLOCK_Q
    unmasked_end = (first_q_pos // BLOCK_N) * BLOCK_N
    for tile_start in range(0, unmasked_end, BLOCK_N):
        pos = tile_start + n
        rows = _kv_rows(block_table_ptr, tile_start, pos, pos < unmasked_end, stride_cb, stride_cs,
                        BLOCK_SIZE, TILE_IN_PAGE)
        kv_off = head_off + rows[:, None] + d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=d_mask[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        v = tl.load(v_cache_ptr + kv_off, mask=d_mask[None, :], other=0.0)
        acc, l, m = _online_softmax_step(acc, l, m, s, v, PRECISION, UPCAST)
    # Tiles on the diagonal: causal mask, and stop at the tile's last query position.
    kv_end = tl.minimum(context_len, num_cached + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q))
    for tile_start in range(unmasked_end, kv_end, BLOCK_N):
        pos = tile_start + n
        pos_mask = pos < kv_end
        rows = _kv_rows(block_table_ptr, tile_start, pos, pos_mask, stride_cb, stride_cs,
                        BLOCK_SIZE, TILE_IN_PAGE)
        kv_off = head_off + rows[:, None] + d[None, :]
        kv_mask = pos_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        s = tl.where(pos_mask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        acc, l, m = _online_softmax_step(acc, l, m, s, v, PRECISION, UPCAST)

    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def baseline_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                               max_query_len, scale, *, out=None, tiles=None):
    """engine.kernels.paged_prefill_attention as of 93476b2 (same contract; tiles of this
    module's `prefill_tile_tokens`, grid (P, num_kv_heads))."""
    group, head_dim = _check(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    out = _output(q, out)
    batch = context_lens.shape[0]
    num_kv_heads = q.shape[1] // group
    if tiles is not None:
        if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 2:
            raise ValueError(f"paged attention: tiles must be int32 [P, 2], got {tiles.dtype} {tuple(tiles.shape)}")
        block_q = prefill_tile_tokens(q.shape[1], num_kv_heads, q.dtype)
        grid = (tiles.shape[0], num_kv_heads)
        if tiles.shape[0] == 0 or batch == 0:
            return out
    else:
        if batch == 0 or max_query_len <= 0 or q.shape[0] == 0:
            return out
        block_q = prefill_tile_tokens(q.shape[1], num_kv_heads, q.dtype, max_query_len)
        grid = (triton.cdiv(max_query_len, block_q), batch, num_kv_heads)
    block_size = k_cache.shape[1]
    group_pad = triton.next_power_of_2(group)
    block_n = PREFILL_BLOCK_N if q.dtype != torch.float32 else PREFILL_BLOCK_N // 2
    precision, upcast = _dot_flags(q.dtype)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
        tiles if tiles is not None else query_start_loc, out,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_M=block_q * group_pad, BLOCK_N=block_n,
        TILE_IN_PAGE=block_size % block_n == 0, USE_TILES=tiles is not None,
        PRECISION=precision, UPCAST=upcast,
        num_warps=PREFILL_NUM_WARPS if block_q * group_pad >= 128 else 4,
        num_stages=PREFILL_NUM_STAGES,
    )
    return out
