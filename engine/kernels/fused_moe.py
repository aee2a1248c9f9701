"""Fused mixture-of-experts in Triton: the (token, expert) pairs sorted by expert, then one
grouped GEMM per projection over the stacked expert weights.

    align      pairs of the [T, k] routing sorted by expert, each expert's run padded to a
               multiple of BLOCK_M rows, so every row block belongs to one expert
    gate_up    per row block: x[tokens] @ w13[e]^T, silu(gate) * up  -> h [T*k, I]
    down       per row block: h[pairs] @ w2[e]^T * routing weight    -> y [T*k, H]
    sum        y.view(T, k, H).sum(1)   (no atomics: deterministic)

Capture-safe: every shape and grid depends only on T, k, E and the block sizes (the number
of row blocks is bounded by min(E, T*k) + T*k / BLOCK_M); blocks past the used ones exit
at once, reading their expert id (E = none) from device memory. No host synchronization.
Row blocks are 16 pairs (decode: few tokens per expert, little padding) or 64 once experts
average 64 pairs (prefill: full-width tensor-core tiles); the grid runs a row block's output
tiles back to back, and one expert's row blocks one after another, so its weights are
re-read from L2, not HBM. Block sizes are chosen, not yet tuned on a GPU.
"""
import os

import torch
import triton
import triton.language as tl

BLOCK_M = 16                 # rows per block for decode-sized batches
BLOCK_M_LARGE = 64           # ... once there are this many pairs per expert on average
# The Triton interpreter (CPU tests) multiplies the raw bits of bf16 operands in tl.dot;
# there the operands are upcast to fp32 first, which is exact (as engine.kernels.paged_attention)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def max_row_blocks(num_pairs: int, num_experts: int, block_m: int = BLOCK_M) -> int:
    """An upper bound on the row blocks of any routing: each used expert pads at most one
    partial block."""
    return min(num_experts, num_pairs) + triton.cdiv(num_pairs, block_m)


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """ids [T, k] -> (sorted_pairs int32 [R*block_m]: pair index t*k + slot, or T*k for a
    padding row; block_expert int32 [R]: the expert of each row block, num_experts = unused),
    R = max_row_blocks. Device ops only."""
    flat = ids.reshape(-1)
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


@triton.jit
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
             h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < inter))


@triton.jit
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
    y = acc.to(y_ptr.dtype.element_ty)
    weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
    y = (y.to(tl.float32) * weight[:, None]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + pairs[:, None].to(tl.int64) * stride_yt + offs_n[None, :], y,
             mask=valid[:, None] & (offs_n[None, :] < hidden))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, block_m: int | None = None, block_n: int = 64,
              block_k: int = 64) -> torch.Tensor:
    """The same contract as engine.layers.moe.moe_reference: x [T, H], w13 [E, 2I, H],
    w2 [E, H, I], weights [T, k] (float32), ids [T, k] -> [T, H] in x's dtype.
    block_m: rows per block (None: BLOCK_M, or BLOCK_M_LARGE from 64 pairs per expert)."""
    num_tokens, top_k = ids.shape
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    if w2.shape != (num_experts, hidden, inter) or x.shape[1] != hidden:
        raise ValueError(f"fused_moe shapes disagree: x {tuple(x.shape)}, w13 "
                         f"{tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    x = x.contiguous()
    num_pairs = num_tokens * top_k
    if block_m is None:
        block_m = BLOCK_M_LARGE if num_pairs >= BLOCK_M_LARGE * num_experts else BLOCK_M
    pairs, block_expert = align_by_expert(ids, num_experts, block_m)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    flat_weights = weights.reshape(-1).float().contiguous()
    upcast = _INTERPRETED and x.dtype == torch.bfloat16
    # fp32 stays fp32 (Triton's default for fp32 operands on a GPU is TF32: a 1e-3 error that
    # flipped a near-tie greedy token of Mixtral in check_moe_gpu)
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"
    grid = (triton.cdiv(inter, block_n), block_expert.numel())
    _gate_up_kernel[grid](x, w13, h, pairs, block_expert, num_pairs, top_k, hidden, inter,
                          num_experts, x.stride(0), w13.stride(0), w13.stride(1),
                          w13.stride(2), h.stride(0),
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=upcast,
                          PRECISION=precision)
    grid = (triton.cdiv(hidden, block_n), block_expert.numel())
    _down_kernel[grid](h, w2, y, flat_weights, pairs, block_expert, num_pairs, hidden, inter,
                       num_experts, h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2),
                       y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       UPCAST=upcast, PRECISION=precision)
    return y.view(num_tokens, top_k, hidden).float().sum(1).to(x.dtype)
