"""Write this step's keys and values into the paged KV cache.

Cache layout (per layer): `[num_blocks, block_size, num_kv_heads, head_dim]`, the paged
layout of FlashAttention. Token slot `s` lives at block `s // block_size`, row
`s % block_size`; the host computes `slot = block_table[pos // block_size] * block_size +
pos % block_size` for every new token.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)  # int64: big caches pass 2**31 elements
    if slot < 0:  # -1 marks padding rows (e.g. CUDA-graph batches padded to a captured size)
        return
    block = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + row * stride_kcs + h * stride_kch + d, k, mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + row * stride_vcs + h * stride_vch + d, v, mask=mask)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter `key`/`value` (`[N, num_kv_heads, head_dim]`) into `k_cache`/`v_cache`
    (`[num_blocks, block_size, num_kv_heads, head_dim]`) at `slot_mapping` (`[N]` int64 or
    int32, `slot = block_id * block_size + offset`; `-1` skips the row).

    Any block_size >= 1 and any head_dim work. key/value may be strided views (e.g. slices of
    a fused QKV projection) as long as their last dimension is contiguous. No host sync, no
    allocation: safe inside a CUDA graph. Slots are not bounds-checked (that would need a
    sync); the caller owns them.
    """
    n, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"store_kvcache: value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"store_kvcache: k_cache/v_cache must both be [num_blocks, block_size, "
                         f"num_kv_heads, head_dim], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"store_kvcache: cache heads/dim {tuple(k_cache.shape[2:])} != "
                         f"key heads/dim {(num_kv_heads, head_dim)}")
    if key.dtype != k_cache.dtype or value.dtype != v_cache.dtype:
        raise ValueError(f"store_kvcache: dtypes differ: key {key.dtype}, value {value.dtype}, "
                         f"k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if slot_mapping.shape != (n,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"store_kvcache: slot_mapping must be int32/int64 of shape ({n},), got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"store_kvcache: {name} must be contiguous in its last dimension, "
                             f"strides {t.stride()}")
    if n == 0:
        return
    _store_kvcache_kernel[(n,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
    )
