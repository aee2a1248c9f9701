"""FlashInfer attention: per-step planning of flashinfer's paged-KV wrappers.

flashinfer splits attention into plan() (host: reads the page table's lengths, schedules
the work, uploads the index arrays) and run() (device: the kernel). The model runner owns
one `FlashInferPlanner`, plans once per step before the forward (or graph replay), and
hands the planned wrapper to every layer through `AttentionMetadata.wrapper`; each layer
then calls `wrapper.run(q, (k_cache, v_cache))`.

The engine's paged cache is flashinfer's "NHD" layout as it is: per layer K and V are
[num_blocks, block_size, num_kv_heads, head_dim] (page = block). A sequence's pages are
described in CSR form: paged_kv_indptr [B+1] (prefix sums of pages per sequence),
paged_kv_indices [nnz] (the block ids, concatenated) and paged_kv_last_page_len [B]
(tokens in each sequence's last page, 1..block_size).

Which wrapper a step uses:
  graph_bs > 0       a CUDA-graph decode wrapper of that batch size (fixed device buffers,
                     use_cuda_graph=True); flashinfer requires plan() before every replay
  decode-only, eager the eager decode wrapper
  anything else      the prefill wrapper, causal, over all rows (decodes are rows of q_len 1)

Constraints: q/KV dtype float16 or bfloat16 (flashinfer has no float32 attention kernels);
CUDA only. Tensor parallelism works: every rank plans from the host copy of the step
(followers copy it back from the device first; see ModelRunner.plan_attention).
"""
import numpy as np
import torch

WORKSPACE_BYTES = 256 << 20    # flashinfer's float scratch (split-KV partial results)
DTYPES = (torch.float16, torch.bfloat16)


def paged_kv_layout(context_lens: np.ndarray, block_tables: np.ndarray, block_size: int,
                    indptr: np.ndarray, indices: np.ndarray, last_page_len: np.ndarray):
    """flashinfer's CSR page table for the B = len(block_tables) sequences, written into the
    given int32 buffers (indptr >= B+1, indices >= total pages, last_page_len >= B
    entries); returns the filled views (indptr[:B+1], indices[:nnz], last_page_len[:B]).

    Sequence b owns the first ceil(context_lens[b] / block_size) entries of
    block_tables[b] (every context_len >= 1); the rest of its row is never read."""
    B, W = block_tables.shape
    pages = (context_lens[:B].astype(np.int64) + block_size - 1) // block_size
    indptr[0] = 0
    np.cumsum(pages, out=indptr[1:B + 1])
    nnz = int(indptr[B])
    # flat position of page j of row b in the row-major table: b * W + j, with
    # j = k - indptr[b] for the k-th page overall
    start = np.arange(B, dtype=np.int64) * W - indptr[:B]
    flat = np.arange(nnz, dtype=np.int64) + np.repeat(start, pages)
    np.take(block_tables.reshape(-1), flat, out=indices[:nnz])
    last_page_len[:B] = context_lens[:B] - (pages - 1) * block_size
    return indptr[:B + 1], indices[:nnz], last_page_len[:B]


class FlashInferPlanner:
    """One rank's flashinfer state: the workspace, the wrappers and the pinned host arrays
    plan() builds the page table in.

    `layers` are the model's Attention modules (heads per rank, head_dim and softmax
    scale are read from them: plan() bakes the scale into the wrapper). `max_seqs` and
    `max_blocks` bound a step's rows and each row's pages.
    """

    def __init__(self, layers, block_size: int, dtype: torch.dtype, max_seqs: int,
                 max_blocks: int, device: torch.device):
        import flashinfer   # optional dependency: only this backend needs it
        if dtype not in DTYPES:
            raise ValueError(f"attention backend 'flashinfer' needs dtype float16 or bfloat16 "
                             f"(flashinfer has no {dtype} attention kernels); use 'triton'")
        first = layers[0]
        if any(layer.scale != first.scale for layer in layers):
            raise ValueError("attention backend 'flashinfer' plans one softmax scale for all layers")
        self.flashinfer, self.device, self.dtype = flashinfer, device, dtype
        self.block_size, self.max_blocks = block_size, max_blocks
        self.shape = (first.num_heads, first.num_kv_heads, first.head_dim)
        self.scale = first.scale
        # GQA decode: with 4+ query heads per KV head the tensor-core (prefill-style)
        # kernel beats the CUDA-core decode kernel; below that the decode kernel wins
        self.use_tensor_cores = first.num_heads // first.num_kv_heads >= 4
        # One float workspace for every wrapper: only one wrapper runs at a time (one plan
        # per step, steps are serial); each wrapper keeps its own int workspace.
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores)
        self.graph_decode = {}   # batch size -> CUDA-graph decode wrapper
        # Pinned: plan() uploads them asynchronously. The runner waits for the last plan's
        # uploads before the next plan rewrites them (ModelRunner.plan_attention).
        pin = device.type == "cuda"
        self.indptr = torch.zeros(max_seqs + 1, dtype=torch.int32, pin_memory=pin)
        self.indices = torch.zeros(max_seqs * max_blocks, dtype=torch.int32, pin_memory=pin)
        self.last_page_len = torch.zeros(max_seqs, dtype=torch.int32, pin_memory=pin)
        self.host = (self.indptr.numpy(), self.indices.numpy(), self.last_page_len.numpy())

    def graph_wrapper(self, batch_size: int):
        """The CUDA-graph decode wrapper of `batch_size`, made on first use (capture_graphs
        plans each size before capturing it): its index buffers are fixed device tensors
        the graph reads, sized for batch_size rows of max_blocks pages."""
        wrapper = self.graph_decode.get(batch_size)
        if wrapper is None:
            i32 = dict(dtype=torch.int32, device=self.device)
            wrapper = self.graph_decode[batch_size] = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.use_tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(batch_size + 1, **i32),
                paged_kv_indices_buffer=torch.zeros(batch_size * self.max_blocks, **i32),
                paged_kv_last_page_len_buffer=torch.zeros(batch_size, **i32))
        return wrapper

    def plan(self, query_start_loc: np.ndarray, context_lens: np.ndarray,
             block_tables: np.ndarray, num_decode_tokens: int, graph_bs: int):
        """Plan this step and return the wrapper its layers run. Host numpy inputs, as
        packed by the runner: query_start_loc [B+1], context_lens [B], block_tables [B, W]
        (B = the step's rows, graph padding rows included: they are planned like any
        row, context 1 on block 0, and their output is ignored)."""
        _, indices, last = paged_kv_layout(context_lens, block_tables, self.block_size,
                                           *self.host)
        B, nnz = len(last), len(indices)
        # We upload the indices ourselves, asynchronously: flashinfer copies host indices
        # into a graph wrapper's buffer with a blocking copy (a stream sync per step).
        kv = (self.indptr[:B + 1], self.indices[:nnz].to(self.device, non_blocking=True),
              self.last_page_len[:B])
        heads, kv_heads, head_dim = self.shape
        types = dict(q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.scale)
        if graph_bs or num_decode_tokens == B:
            wrapper = self.graph_wrapper(graph_bs) if graph_bs else self.decode
            wrapper.plan(*kv, heads, kv_heads, head_dim, self.block_size, **types)
        else:
            wrapper = self.prefill
            wrapper.plan(torch.from_numpy(query_start_loc[:B + 1]), *kv, heads, kv_heads,
                         head_dim, self.block_size, causal=True, **types)
        return wrapper
