"""Triton kernels of the engine: writing K/V into the paged cache and attending over it, and
sampling a token per row of logits (`sample_from_logits`).

Use `store_kvcache` then `paged_attention` in every attention layer; `paged_decode_attention`
and `paged_prefill_attention` are the two halves it dispatches to, for callers that split a step
into a decode-only and a prefill-only part. `engine.kernels.launch` holds their launch geometry
as host rules, importable without Triton: where Triton is absent (it ships Linux wheels only)
this package exports nothing else, and the CPU engine's torch path never asks for more.
"""
try:
    import triton  # noqa: F401
except ImportError:
    __all__ = []
else:
    from engine.kernels.paged_attention import (choose_num_splits, paged_attention,
                                                paged_decode_attention, paged_prefill_attention)
    from engine.kernels.sample import sample_from_logits
    from engine.kernels.store_kv import store_kvcache

    __all__ = ["choose_num_splits", "paged_attention", "paged_decode_attention",
               "paged_prefill_attention", "sample_from_logits", "store_kvcache"]
