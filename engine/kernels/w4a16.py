"""W4A16: y = x W^T with W stored as 4-bit GPTQ or AWQ tensors (engine.layers.quant documents
the layouts), dequantized in registers; x and y in the activation dtype, accumulation in fp32.

One kernel, read straight from the checkpoint layouts (no repacking), in two launch shapes:
  - GEMM (prefill-sized M): [BLOCK_M x BLOCK_N] output tiles, the whole K per program;
  - split-K (decode-sized M, or whenever the output has too few tiles to fill the GPU): K
    split over SPLIT_K programs that add their partial sums into an fp32 output (atomics;
    the summation order, hence the last bits, may vary run to run), so that a batch-1 step
    still spreads the weight read over every SM.
Each K step loads a [BLOCK_K, BLOCK_N] tile of 4-bit values (GPTQ: 8 input rows per int32;
AWQ: 8 interleaved output columns per int32), the tile's zeros and fp16 scales (one group per
tile when BLOCK_K divides the group size; per row through g_idx under act-order), and
multiplies (q - zero) * scale with the x tile on the tensor cores.

Capture-safe: no host synchronization; the only allocations are the output (and, for
split-K, its fp32 accumulator).
"""
import functools

import torch
import triton
import triton.language as tl

SPLIT_K_MAX_M = 32


@triton.jit
def _w4a16_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, y_ptr,
                  M, N, K, stride_xm, stride_ym, group_size, zero_offset,
                  AWQ: tl.constexpr, ACT_ORDER: tl.constexpr, SPLIT_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    n8 = N // 8
    # bit position of column n inside its packed word: natural (GPTQ zeros) or AWQ's
    # interleave (value k of a word is column (0,2,4,6,1,3,5,7)[k], so column c sits at
    # position c // 2 + 4 * (c % 2))
    c = offs_n % 8
    if AWQ:
        col_shift = (c // 2 + 4 * (c % 2)) * 4
    else:
        col_shift = c * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_k[:, None] & mask_n[None, :]
        if AWQ:   # [K, N/8]: 8 output columns per word
            words = tl.load(qweight_ptr + offs_k[:, None] * n8 + (offs_n // 8)[None, :],
                            mask=wmask, other=0)
            q = (words >> col_shift[None, :]) & 0xF
        else:     # GPTQ [K/8, N]: 8 input rows per word
            words = tl.load(qweight_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :],
                            mask=wmask, other=0)
            q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
        if ACT_ORDER:   # each input row names its group
            g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
            zw = tl.load(qzeros_ptr + g[:, None] * n8 + (offs_n // 8)[None, :], mask=wmask, other=0)
            z = ((zw >> col_shift[None, :]) & 0xF) + zero_offset
            s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=wmask, other=0.0)
            w = (q - z).to(tl.float32) * s.to(tl.float32)
        else:           # BLOCK_K divides the group size: one group per tile
            g = k0 // group_size
            zw = tl.load(qzeros_ptr + g * n8 + offs_n // 8, mask=mask_n, other=0)
            z = ((zw >> col_shift) & 0xF) + zero_offset
            s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0)
            w = (q - z[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]
        acc += tl.dot(x, w.to(x.dtype))
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_config(m: int, n: int, k: int, block_k: int, num_sms: int) -> dict:
    """Tile sizes by M (small tiles for decode batches, large for prefill), then split-K
    until the grid covers ~2 waves of the SMs (with at least 4 K-steps per program): a
    decode step's [M, N] output alone is too few tiles to read the weights at full speed."""
    if m <= SPLIT_K_MAX_M:
        cfg = dict(BLOCK_M=16 if m <= 16 else 32, BLOCK_N=64, BLOCK_K=block_k, num_warps=4)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, num_warps=8, num_stages=3)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    cfg["SPLIT_K"] = max(1, min(k // (4 * block_k), triton.cdiv(2 * num_sms, tiles)))
    return cfg


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                 scales: torch.Tensor, g_idx: torch.Tensor | None, method: str,
                 group_size: int, act_order: bool, zero_offset: int = 0,
                 config: dict | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) times the dequantized W [N, K]^T -> [M, N] in x's dtype.
    method "gptq" | "awq"; group_size -1 = one group; g_idx needed under act_order.
    config: tile sizes (default: by M, see _launch_config)."""
    m, k = x.shape
    n = scales.shape[1]
    x = x if x.stride(1) == 1 else x.contiguous()
    gs = k if group_size == -1 else group_size
    block_k = 32 if gs % 64 else 64
    cfg = dict(config or _launch_config(m, n, k, block_k, _num_sms(x.device)))
    if not act_order and gs % cfg["BLOCK_K"]:
        raise ValueError(f"BLOCK_K {cfg['BLOCK_K']} must divide group_size {gs}")
    split_k = cfg.pop("SPLIT_K")
    if split_k > 1:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _w4a16_kernel[grid](x, qweight, qzeros, scales, qweight if g_idx is None else g_idx, y,
                        m, n, k, x.stride(0), y.stride(0), gs, zero_offset,
                        AWQ=method == "awq", ACT_ORDER=act_order, SPLIT_K=split_k, **cfg)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def w4a16_linear(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A quantized linear layer (engine.layers.quant) on x [..., K]."""
    q = layer.quant
    shape = x.shape
    y = w4a16_matmul(x.reshape(-1, shape[-1]), layer.qweight, layer.qzeros, layer.scales,
                     getattr(layer, "g_idx", None), q.method, q.group_size, q.desc_act,
                     q.zero_offset)
    if bias is not None:
        y += bias
    return y.view(*shape[:-1], y.shape[-1])
