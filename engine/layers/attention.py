"""Paged attention: `AttentionMetadata`, the `Attention` module and its backends.

One forward computes a flattened batch of T new tokens from B sequences (varlen: no
padding). Sequence b's queries are rows query_start_loc[b]:query_start_loc[b+1]; they are
the LAST q_len tokens of its context_lens[b] tokens, so attention is causal with an offset
of context_len - q_len. Each layer's KV lives in a paged cache, [num_blocks, block_size,
num_kv_heads, head_dim] for K and for V; token t of sequence b is in block
block_tables[b, t // block_size] at offset t % block_size. Every step first stores its new
K/V (at slot_mapping: block * block_size + offset, -1 = skip), then attends over the cache.

Backends (chosen by name when the model is built):
  torch      reference and CPU path: gathers each sequence's KV and runs SDPA (reads
             lengths on the host, so it cannot be captured in a CUDA graph).
  triton     engine.kernels (store_kvcache + paged_attention); the CUDA default.
  flash_attn flash-attn 2's paged varlen kernel (needs block_size % 256 == 0).
  flashinfer flashinfer's paged prefill / decode wrappers (float16 / bfloat16, any block
             size); the model runner plans them once per step (engine.layers.
             flashinfer_backend) and passes the planned wrapper in AttentionMetadata.
"auto" = triton on CUDA, torch elsewhere. triton runs on the CPU only under the Triton
interpreter (TRITON_INTERPRET=1), for tests.
"""
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("torch", "triton", "flash_attn", "flashinfer")


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, built by the model runner (device tensors + ints).

    slot_mapping      int64 [T]      cache slot of each new token's K/V (-1: do not store)
    block_tables      int32 [B, M]   block ids of each sequence (padding entries unused)
    context_lens      int32 [B]      KV length of each sequence after this step
    query_start_loc   int32 [B+1]    row offsets of each sequence's queries in the batch
    max_query_len     int            max q_len over the batch
    max_context_len   int            max context_len over the batch
    num_decode_tokens int            the first num_decode_tokens sequences are decodes
                                     (q_len 1); the runner orders them first
    decode_rows       int            triton, runner-built steps: the decode kernel scans
                                     sequences [0, decode_rows) and computes those with
                                     q_len 1 (graph-safe: no host int depends on the step)
    prefill_tiles     int32 [P, 2]   triton, runner-built steps: (sequence, query tile) of
                                     every prefill program (b = -1: none); None = no prefill
    decode_work       (int32 [D, 4], int32 [B, 2])  triton, runner-built steps: the split-KV
                                     plan of the decode rows (engine.kernels.launch.
                                     plan_decode_work); None = equal splits, chosen by shape
    cu_seqlens_k      int32 [B+1]    optional: prefix sums of context_lens (flash_attn
                                     computes them when absent)
    wrapper           object         flashinfer only: the wrapper planned for this step
                                     (FlashInferPlanner.plan); None for other backends
    side_stream       object         triton, runner-built steps with decode rows and
                                     prefill tiles: the CUDA stream the decode kernel runs
                                     on beside the prefill kernel (EngineConfig.
                                     attention_streams); None = one stream
    """
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_context_len: int
    num_decode_tokens: int = 0
    decode_rows: int = 0
    prefill_tiles: torch.Tensor | None = None
    decode_work: tuple[torch.Tensor, torch.Tensor] | None = None
    cu_seqlens_k: torch.Tensor | None = None
    wrapper: object | None = None
    side_stream: object | None = None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map "auto" to a concrete backend for `device` and check that it can run there."""
    device = torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of "
                         f"{('auto',) + BACKENDS}")
    interpreted = name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if name in ("triton", "flash_attn", "flashinfer") and device.type != "cuda" and not interpreted:
        raise ValueError(f"attention backend {name!r} needs a CUDA device, got {device}"
                         + (" (or TRITON_INTERPRET=1 to interpret the kernels on the CPU)"
                            if name == "triton" else ""))
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attention backend 'flash_attn' needs the flash-attn package "
                             "(pip install flash-attn); use 'triton' instead")
    if name == "flashinfer":
        if importlib.util.find_spec("flashinfer") is None:
            raise ValueError("attention backend 'flashinfer' needs the flashinfer package "
                             "(pip install flashinfer-python); use 'triton' instead")
    return name


# ---- torch backend ----------------------------------------------------------------------

def torch_store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    # view (not reshape): writing into a copy would silently lose the KV
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[keep])
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[keep])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Q, H, D] are the last Q of the L keys k, v [L, Hkv, D]; causal; -> [Q, H, D]."""
    q_len, ctx_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    if group > 1:  # repeat KV heads: every SDPA kernel accepts that (not all take enable_gqa)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if q_len == ctx_len:  # no cached prefix: the plain causal mask (lets flash kernels run)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        mask = torch.ones(q_len, ctx_len, dtype=torch.bool, device=q.device).tril(ctx_len - q_len)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def torch_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """All decodes (q_len 1) at once: gather KV padded to the longest context, mask the
    rest. q [N, H, D] -> [N, H, D]."""
    block_size, num_blocks = k_cache.shape[1], k_cache.shape[0]
    width = -(-int(context_lens.max()) // block_size)
    # padding entries of the table are read (then masked): keep them in range
    blocks = block_tables[:, :width].long().clamp(0, num_blocks - 1)
    k, v = k_cache[blocks].flatten(1, 2), v_cache[blocks].flatten(1, 2)  # [N, L, Hkv, D]
    group = q.shape[1] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    mask = torch.arange(k.shape[1], device=q.device) < context_lens[:, None]  # [N, L]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], scale=scale)
    return out.squeeze(2)


def torch_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    block_size = k_cache.shape[1]
    starts = meta.query_start_loc.tolist()
    ctx_lens = meta.context_lens.tolist()
    out = torch.empty_like(q)
    num_decodes = meta.num_decode_tokens
    if num_decodes:
        out[:num_decodes] = torch_decode_attention(
            q[:num_decodes], k_cache, v_cache, meta.block_tables[:num_decodes],
            meta.context_lens[:num_decodes], scale)
    for b in range(num_decodes, len(ctx_lens)):
        s, e, ctx_len = starts[b], starts[b + 1], ctx_lens[b]
        if e == s:
            continue
        blocks = meta.block_tables[b, :(ctx_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx_len]
        v = v_cache[blocks].flatten(0, 1)[:ctx_len]
        out[s:e] = _sdpa(q[s:e], k, v, scale)
    return out


def torch_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention over this step's own K/V only (no cache yet, e.g. a warm-up forward):
    every sequence's context must be exactly its new tokens."""
    starts = meta.query_start_loc.tolist()
    if [e - s for s, e in zip(starts[:-1], starts[1:])] != meta.context_lens.tolist():
        raise ValueError("attention without a KV cache needs context_lens == query lengths "
                         "(no cached prefix); assign the layers' k_cache / v_cache first")
    out = torch.empty_like(q)
    for s, e in zip(starts[:-1], starts[1:]):
        out[s:e] = _sdpa(q[s:e], k[s:e], v[s:e], scale)
    return out


# ---- triton backend (engine.kernels, imported lazily: CPU tests never need it) -----------

def triton_store_kvcache(k, v, k_cache, v_cache, slot_mapping) -> None:
    from engine.kernels import store_kvcache
    store_kvcache(k, v, k_cache, v_cache, slot_mapping)


def triton_paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    from engine.kernels import paged_attention, paged_decode_attention, paged_prefill_attention
    if meta.decode_rows or meta.prefill_tiles is not None:
        # The model runner's steps: a fixed launch shape per step shape (CUDA graphs of
        # mixed steps), decode rows on the split-KV kernel, prefill tiles from the list.
        out = torch.empty_like(q)
        rows = meta.decode_rows

        def decode():
            paged_decode_attention(q, k_cache, v_cache, meta.block_tables[:rows],
                                   meta.context_lens[:rows], scale, out=out,
                                   query_start_loc=meta.query_start_loc, work=meta.decode_work)

        side = meta.side_stream if rows and meta.prefill_tiles is not None else None
        if side is not None:   # fork: the decodes beside the prefill (disjoint rows of `out`)
            main = torch.cuda.current_stream()
            side.wait_stream(main)          # q and this step's stored K/V are ready
            with torch.cuda.stream(side):
                decode()
        elif rows:
            decode()
        if meta.prefill_tiles is not None:
            paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                    meta.query_start_loc, 0, scale, out=out, tiles=meta.prefill_tiles)
        if side is not None:
            main.wait_stream(side)          # join before anything reads `out`
        return out
    # Metadata built by hand (tests, scripts): the kernels' own dispatch by max_query_len.
    return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                           meta.query_start_loc, meta.max_query_len, meta.max_context_len, scale)


# ---- flash-attn 2 backend ----------------------------------------------------------------

def flash_paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    from flash_attn import flash_attn_varlen_func
    block_size = k_cache.shape[1]
    if block_size % 256:
        raise ValueError(f"attention backend 'flash_attn' needs block_size % 256 == 0 "
                         f"(flash-attn's paged KV), got block_size {block_size}; use 'triton'")
    cu_k = meta.cu_seqlens_k
    if cu_k is None:
        cu_k = F.pad(meta.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
    return flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=meta.query_start_loc,
                                  cu_seqlens_k=cu_k, max_seqlen_q=meta.max_query_len,
                                  max_seqlen_k=meta.max_context_len, softmax_scale=scale,
                                  causal=True, block_table=meta.block_tables)


# ---- flashinfer backend (the runner plans the wrapper: engine.layers.flashinfer_backend) ---

def flashinfer_paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    # `scale` is already in the wrapper: the planner planned it with the layers' scale
    if meta.wrapper is None:
        raise ValueError("attention backend 'flashinfer' needs a planned wrapper in "
                         "AttentionMetadata.wrapper (the ModelRunner plans one per step)")
    return meta.wrapper.run(q, (k_cache, v_cache))


STORE = {"torch": torch_store_kvcache, "triton": triton_store_kvcache,
         "flash_attn": triton_store_kvcache, "flashinfer": triton_store_kvcache}
ATTEND = {"torch": torch_paged_attention, "triton": triton_paged_attention,
          "flash_attn": flash_paged_attention, "flashinfer": flashinfer_paged_attention}


class Attention(nn.Module):
    """Stores this step's K/V in the layer's paged cache, then attends over it.

    `k_cache` / `v_cache` ([num_blocks, block_size, num_kv_heads, head_dim]) start empty;
    the model runner assigns them once it has sized the KV pool. With empty caches the
    layer attends over the step's own K/V only (prefill of fresh prompts, e.g. warm-up).

    forward(q [T, H, D], k [T, Hkv, D], v [T, Hkv, D], meta) -> [T, H, D]
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 backend: str = "torch"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.backend = backend
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.k_cache.numel() == 0:
            return torch_varlen_attention(q, k, v, meta, self.scale)
        STORE[self.backend](k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend(q, meta)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention over the cache alone (this step's K/V already stored)."""
        return ATTEND[self.backend](q, self.k_cache, self.v_cache, meta, self.scale)

    def attend_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                   eps: float, meta: AttentionMetadata) -> torch.Tensor | None:
        """The whole layer's attention from the qkv projection's output [T, (H + 2 Hkv) * D]
        in one decode launch (q/k RMSNorm, RoPE and the K/V store inside it: engine.kernels.
        paged_attention.paged_decode_attention_qkv), where that applies: the triton backend,
        a runner-built decode-only step (its split-KV plan, no prefill tiles), the KV cache
        assigned, and the fold on (engine.kernels.paged_attention.FOLD_QKV). Returns
        [T, H, D], or None: then the caller stores and attends in two launches."""
        if (self.backend != "triton" or meta.prefill_tiles is not None or meta.decode_work is None
                or not meta.decode_rows or self.k_cache.numel() == 0):
            return None
        pa = importlib.import_module("engine.kernels.paged_attention")   # (the package's
        if not pa.FOLD_QKV:                                  # name `paged_attention` is a function)
            return None
        rows = meta.decode_rows
        return pa.paged_decode_attention_qkv(
            qkv, positions, cos, sin, q_norm, k_norm, eps, self.num_heads, self.k_cache, self.v_cache,
            meta.block_tables[:rows], meta.context_lens[:rows], meta.slot_mapping, self.scale,
            query_start_loc=meta.query_start_loc, work=meta.decode_work)
