"""Fused elementwise kernels of a decoder layer, so a step launches a few fat kernels per
layer instead of a dozen thin ones (and no torch.compile wrapper or guard runs per call):

  add_rmsnorm          residual add + RMSNorm                        (2 per layer, or 0 where
                       the qkv / gate_up skinny GEMMs apply it in their prologue)
  silu_and_mul         SwiGLU: silu(gate) * up                       (1 per layer, or 0 where
                       the down projection's skinny GEMM applies it in its prologue)
  qk_norm_rope_store   split the fused QKV output, q/k RMSNorm (Qwen3), RoPE on q and k,
                       and K/V into the paged cache                  (1 per layer)

Each rounds to the activation dtype where the torch reference layers do (engine.layers:
RMSNorm, SiluAndMul, RotaryEmbedding), so bf16 results track them and fp32 results equal
them up to float reassociation. One program per token row; no host sync and no allocation
but the outputs: safe inside CUDA graphs.
"""
import torch
import triton
import triton.language as tl

from engine.kernels import pdl


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                        stride_x, stride_r, stride_o, stride_ro,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:   # the sum is rounded to the activation dtype: it is the residual stream
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None):
    """RMSNorm of x (or of x + residual). x, residual [T, N]. Returns y, or (y, x + residual)
    like engine.layers.RMSNorm."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"add_rmsnorm: x must be [T, N] contiguous in N, got {tuple(x.shape)} strides {x.stride()}")
    rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    if rows:
        r = residual if residual is not None else x
        _add_rmsnorm_kernel[(rows,)](x, r, weight, out, res_out, n, eps, x.stride(0), r.stride(0),
                                     out.stride(0), res_out.stride(0),
                                     HAS_RESIDUAL=residual is not None,
                                     BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8,
                                     PDL=pdl.enabled(), **pdl.launch_kwargs())
    return out if residual is None else (out, res_out)


@triton.jit
def silu_mul(gate, up):
    """silu(gate) * up in the inputs' dtype, rounded where torch's F.silu(gate) * up rounds.
    The one definition: engine.kernels.skinny_gemm applies it in its prologue, so the fused
    down projection sees exactly the activations silu_and_mul writes."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)   # F.silu rounds here
    return (act * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, silu_mul(gate, up), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2N] = [gate | up] -> silu(gate) * up [T, N]."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_and_mul: x must be [T, 2N] contiguous in its last dim, got {tuple(x.shape)}")
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0),
                                                           BLOCK=block, num_warps=4, PDL=pdl.enabled(),
                                                           **pdl.launch_kwargs())
    return out


@triton.jit
def _rms(x1, x2, w_ptr, half, eps, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr):
    """Per-head RMSNorm of the two halves (x1, x2) of each row, as engine.layers.RMSNorm."""
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / HEAD_DIM + eps)
    d = tl.arange(0, HALF_PAD)
    dm = d < half
    w1 = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + half + d, mask=dm, other=0.0).to(tl.float32)
    y1 = ((f1 * rstd[:, None]).to(x1.dtype).to(tl.float32) * w1[None, :]).to(x1.dtype)
    y2 = ((f2 * rstd[:, None]).to(x2.dtype).to(tl.float32) * w2[None, :]).to(x2.dtype)
    return y1, y2


@triton.jit
def _rope(x1, x2, cos, sin):
    """GPT-NeoX rotation of the halves; each product and sum rounded like the torch layer."""
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    r1 = (f1 * cos).to(dt).to(tl.float32) - (f2 * sin).to(dt).to(tl.float32)
    r2 = (f2 * cos).to(dt).to(tl.float32) + (f1 * sin).to(dt).to(tl.float32)
    return r1.to(dt), r2.to(dt)


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    eps, stride_t, stride_cos, stride_qt, stride_qh, stride_cb, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, H_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, QK_NORM: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl.enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    half = HEAD_DIM // 2
    d = tl.arange(0, HALF_PAD)
    dm = d < half
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=dm, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + d, mask=dm, other=0.0)[None, :]
    row = qkv_ptr + t * stride_t
    # q: [H, D] as two halves; rotated, written to q_out
    h = tl.arange(0, H_PAD)[:, None]
    qm = (h < NUM_HEADS) & dm[None, :]
    q1 = tl.load(row + h * HEAD_DIM + d[None, :], mask=qm, other=0.0)
    q2 = tl.load(row + h * HEAD_DIM + half + d[None, :], mask=qm, other=0.0)
    cos_q, sin_q = cos.to(q1.dtype).to(tl.float32), sin.to(q1.dtype).to(tl.float32)  # tables cast as HF does
    if QK_NORM:
        q1, q2 = _rms(q1, q2, qw_ptr, half, eps, HEAD_DIM, HALF_PAD)
    q1, q2 = _rope(q1, q2, cos_q, sin_q)
    q_dst = q_out_ptr + t * stride_qt + h * stride_qh + d[None, :]
    tl.store(q_dst, q1, mask=qm)
    tl.store(q_dst + half, q2, mask=qm)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:   # -1: a padding row, nothing stored
        kh = tl.arange(0, HKV_PAD)[:, None]
        km = (kh < NUM_KV_HEADS) & dm[None, :]
        k_row = row + NUM_HEADS * HEAD_DIM + kh * HEAD_DIM + d[None, :]
        v_row = k_row + NUM_KV_HEADS * HEAD_DIM
        k1 = tl.load(k_row, mask=km, other=0.0)
        k2 = tl.load(k_row + half, mask=km, other=0.0)
        if QK_NORM:
            k1, k2 = _rms(k1, k2, kw_ptr, half, eps, HEAD_DIM, HALF_PAD)
        k1, k2 = _rope(k1, k2, cos_q, sin_q)
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kh * stride_ch + d[None, :]
        tl.store(k_cache_ptr + dst, k1, mask=km)
        tl.store(k_cache_ptr + dst + half, k2, mask=km)
        tl.store(v_cache_ptr + dst, tl.load(v_row, mask=km, other=0.0), mask=km)
        tl.store(v_cache_ptr + dst + half, tl.load(v_row + half, mask=km, other=0.0), mask=km)


def qk_norm_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                       q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                       k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) * D] (q | k | v, the fused projection's output), positions [T],
    cos/sin float32 [max_position, D/2], q_norm/k_norm [D] weights or None (no q/k norm),
    caches [num_blocks, block_size, Hkv, D], slot_mapping [T] (-1: do not store).
    Returns q [T, H, D] normed and rotated; stores rotated K and V at their slots."""
    T = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qk_norm_rope_store: qkv must be [T, (H + 2 Hkv) * D] contiguous, got {tuple(qkv.shape)}")
    if head_dim % 2 or k_cache.shape[2:] != (num_kv_heads, head_dim) or k_cache.stride() != v_cache.stride():
        raise ValueError(f"qk_norm_rope_store: cache {tuple(k_cache.shape)} does not hold {num_kv_heads} "
                         f"heads of {head_dim} (or K and V strides differ)")
    q = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if T:
        norm = q_norm is not None
        _qk_norm_rope_store_kernel[(T,)](
            qkv, positions, cos, sin, q_norm if norm else cos, k_norm if norm else cos, slot_mapping,
            q, k_cache, v_cache, eps, qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            H_PAD=triton.next_power_of_2(num_heads), HKV_PAD=triton.next_power_of_2(num_kv_heads),
            HEAD_DIM=head_dim, HALF_PAD=triton.next_power_of_2(head_dim // 2),
            BLOCK_SIZE=k_cache.shape[1], QK_NORM=norm, num_warps=4, PDL=pdl.enabled(), **pdl.launch_kwargs())
    return q
