"""Executes the policy's batches on one device: builds each step's inputs, runs the model
(eagerly, or by replaying a CUDA graph for decode-only steps) and samples one token per
sequence. It makes no scheduling decision.

A step is `launch`ed (packed, uploaded, queued: no wait) and later `wait`ed for, so the
engine can schedule and launch step N+1 while step N runs (asynchronous scheduling).

Tensor parallelism: one ModelRunner per rank. Rank 0 packs the step's inputs and
broadcasts them; the other ranks (engine.distributed) receive them and run the same
forward, so no rank but 0 ever sees a Batch.
"""
import math
import time
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.layers.attention import AttentionMetadata, resolve_backend
from engine.layers.flashinfer_backend import FlashInferPlanner
from engine.loader import load_weights
from engine.models import ModelConfig, build_model, resolve_dtype
from engine.sampler import Sampler, SamplingTensors, row_seed
from engine.sampling_params import SamplingParams
from policy import Batch, Sequence

CPU_KV_BYTES = 1 << 30          # default KV pool on the CPU (tests pass num_gpu_blocks)
ALIGN = 256                     # byte alignment of each input inside the step buffer
HEADER_SLOTS = 16               # int64 slots at the front of the step buffer (TP control)
HEADER_BYTES = HEADER_SLOTS * 8
RUN, STOP = 1, 2                # header[0]: what the followers do next
GREEDY = SamplingParams(temperature=0.0)

# The step's inputs, in buffer order: name, numpy dtype, shape in terms of T (tokens),
# B (sequences), W (block-table width), S (sampled sequences) and F (input tokens that the
# previous step sampled and the host has not seen yet: asynchronous scheduling). F's fields
# come last, so the other fields' addresses (which CUDA graphs captured) do not depend on F.
FIELDS = (
    ("input_ids", np.int64, "T"),
    ("positions", np.int64, "T"),
    ("slot_mapping", np.int64, "T"),
    ("context_lens", np.int32, "B"),
    ("query_start_loc", np.int32, "B+1"),
    ("block_tables", np.int32, "B,W"),
    ("logits_rows", np.int64, "S"),       # row of each sampled sequence's last token
    ("temperatures", np.float32, "S"),
    ("top_k", np.int64, "S"),
    ("top_p", np.float32, "S"),
    ("fix_rows", np.int64, "F"),          # input_ids rows to take from the previous step's
    ("fix_src", np.int64, "F"),           # ... sampled tokens, at these indices
)
TORCH_DTYPES = {np.int64: torch.int64, np.int32: torch.int32, np.float32: torch.float32}


def layout(T: int, B: int, W: int, S: int, F: int = 0) -> tuple[list[tuple[int, tuple]], int]:
    """Byte offset and shape of each field (after the header), and the total size. A
    function of the shapes only: a CUDA graph captured for one shape finds its inputs at
    the same addresses in every later step of that shape."""
    dims = {"T": (T,), "B": (B,), "B+1": (B + 1,), "B,W": (B, W), "S": (S,), "F": (F,)}
    spans, offset = [], HEADER_BYTES
    for _, dtype, dim in FIELDS:
        shape = dims[dim]
        spans.append((offset, shape))
        offset += -(-math.prod(shape) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    return spans, offset


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, ... and max_num_seqs."""
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return sizes + [max_num_seqs]


class StepBuffer:
    """Pinned host staging memory and its device twin. Each step's inputs are written into
    the host side and sent with ONE copy; the device tensors are typed views into the twin."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device):
        nbytes = layout(max_tokens, max_seqs, max_blocks, max_seqs, max_seqs)[1]
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=on_gpu)
        self.host_np = self.host.numpy()
        self.device = torch.zeros(nbytes, dtype=torch.uint8, device=device) if on_gpu else self.host
        self.header = self.host_np[:HEADER_BYTES].view(np.int64)
        self.cache: dict[tuple, tuple] = {}   # shapes -> (nbytes, host views, device views)

    def views(self, T: int, B: int, W: int, S: int, F: int = 0) -> tuple[int, list[np.ndarray], list[torch.Tensor]]:
        """Size and (numpy, torch) views of each field for these shapes. Cached: making
        twenty views costs more than packing a decode step."""
        key = (T, B, W, S, F)
        found = self.cache.get(key)
        if found is None:
            if len(self.cache) >= 4096:
                self.cache.clear()
            spans, nbytes = layout(T, B, W, S, F)
            sizes = [math.prod(shape) * np.dtype(dt).itemsize for (_, shape), (_, dt, _) in zip(spans, FIELDS)]
            host = [self.host_np[o:o + n].view(dt).reshape(shape)
                    for (o, shape), n, (_, dt, _) in zip(spans, sizes, FIELDS)]
            device = [self.device[o:o + n].view(TORCH_DTYPES[dt]).view(shape)
                      for (o, shape), n, (_, dt, _) in zip(spans, sizes, FIELDS)]
            found = self.cache[key] = (nbytes, host, device)
        return found

    def upload(self, nbytes: int) -> None:
        if self.device is not self.host:
            self.device[:nbytes].copy_(self.host[:nbytes], non_blocking=True)

    def download(self, nbytes: int) -> None:
        """Device -> host (blocking): for a rank that received the step on the device."""
        if self.device is not self.host:
            self.host[:nbytes].copy_(self.device[:nbytes])


class BlockTableMirror:
    """Numpy copies of recent sequences' block tables, so a step converts only the blocks
    added since the last step instead of every Python int of every table.

    Sound because a block table only grows while its list object lives: the policy
    replaces the list when it frees a sequence's blocks (preemption, finish). The mirror
    holds the list it copied and starts over when the sequence has a different one."""

    def __init__(self, capacity: int, max_blocks: int):
        self.rows = np.zeros((capacity, max_blocks), dtype=np.int32)
        self.entries: dict = {}                   # seq_id -> [row, table list, blocks copied]
        self.free_rows = list(range(capacity))

    def gather(self, seqs: list[Sequence], num_blocks: list[int], out: np.ndarray) -> None:
        """out[i, :num_blocks[i]] = seqs[i].block_table[:num_blocks[i]]; the rest of each
        row is junk the attention never reads."""
        rows = np.empty(len(seqs), dtype=np.int64)
        entries = self.entries
        for i, (seq, k) in enumerate(zip(seqs, num_blocks)):
            entry = entries.get(seq.seq_id)
            if entry is None:
                entry = entries[seq.seq_id] = [self._take_row(seqs), seq.block_table, 0]
            elif entry[1] is not seq.block_table:   # freed and re-allocated: copy afresh
                entry[1], entry[2] = seq.block_table, 0
            if entry[2] < k:
                self.rows[entry[0], entry[2]:k] = seq.block_table[entry[2]:k]
                entry[2] = k
            rows[i] = entry[0]
        np.take(self.rows[:, :out.shape[1]], rows, axis=0, out=out[:len(seqs)])

    def _take_row(self, live: list[Sequence]) -> int:
        if not self.free_rows:    # forget every sequence not in this step
            keep = {seq.seq_id for seq in live}
            for seq_id in [k for k in self.entries if k not in keep]:
                self.free_rows.append(self.entries.pop(seq_id)[0])
        return self.free_rows.pop()


@dataclass(slots=True)
class Step:
    """Host-side facts about one packed step (its tensors are in the StepBuffer)."""
    T: int
    B: int
    W: int
    S: int
    max_query_len: int
    max_context_len: int
    num_decode_tokens: int
    graph_bs: int                          # 0 = eager; else the captured size replayed
    nbytes: int
    F: int = 0                             # input tokens fixed up from the previous step
    order: list[int] | None = None         # batch index of each packed row (None: identity)
    sampled: list[int] | None = None       # packed rows that sample, in logits order
    sampling: SamplingTensors | None = None

    def header(self, cmd: int) -> list[int]:
        return [cmd, self.T, self.B, self.W, self.S, self.max_query_len, self.max_context_len,
                self.num_decode_tokens, self.graph_bs, self.nbytes, self.F]

    @classmethod
    def from_header(cls, h: list[int]) -> "Step":
        return cls(*h[1:11])


@dataclass(slots=True)
class Launched:
    """A step handed to the device. Its sampled tokens (one per `sampled` batch index, in
    logits order) stay on the device as the runner's `last_tokens`, where the next step's
    fix-ups read them; `pending` maps the seq_id of each sampled sequence to its index
    there; `host` receives them (pinned) and `done` fires when they have arrived.
    After `wait`: `device_s`, the device time of the step (CUDA events from its upload to
    its tokens' arrival; on the CPU the forward's time), and `gap_s`, how long the device
    sat idle between the previous step's end and this step's start (host-bound time)."""
    sampled: list[int]
    num_seqs: int
    host: torch.Tensor | None
    pending: dict
    begin: object = None
    done: object = None
    previous: object = None     # the previous step's `done` event
    device_s: float = 0.0
    gap_s: float = 0.0


class ModelRunner:
    """Owns one rank's model shard, KV cache, CUDA graphs and sampler.

    `execute(batch, sampling_params)` (rank 0) returns one token id per batch sequence
    (-1 where `batch.sample[i]` is False). After construction `num_blocks` is the KV pool
    size, agreed by all ranks.

    Asynchronous use (rank 0, tensor_parallel_size 1): `launch(batch, params, pending)`
    queues a step and returns at once; `wait(launched)` returns its tokens. A sequence whose
    last token the previous step sampled but the host has not seen yet (`pending`: seq_id ->
    index, from the previous Launched) gets that token on the device: the policy may
    schedule step N+1 while step N runs.
    """

    def __init__(self, config: EngineConfig, model_config: ModelConfig, rank: int = 0,
                 device: torch.device | None = None):
        self.config, self.model_config, self.rank = config, model_config, rank
        self.tp_size = config.tensor_parallel_size
        self.device = device or torch.device("cpu")
        self.dtype = resolve_dtype(model_config.dtype if config.dtype == "auto" else config.dtype)
        self.block_size = config.block_size
        self.max_blocks = -(-config.max_model_len // config.block_size)
        self.model = build_model(model_config, self.dtype, self.device, rank, self.tp_size,
                                 config.attention_backend, config.max_model_len,
                                 compile=config.compile and self.device.type == "cuda")
        load_weights(self.model, config.model)
        self.sampler = Sampler(self.device, config.seed, fused=self.device.type == "cuda")
        self.graph_sizes: list[int] = []    # decode sizes with a graph (set by capture_graphs)
        self.buffer = StepBuffer(max(config.max_num_batched_tokens, config.max_num_seqs),
                                 config.max_num_seqs, self.max_blocks, self.device)
        self.block_tables = BlockTableMirror(2 * config.max_num_seqs + 2, self.max_blocks)
        self.wait_s = 0.0   # seconds the last `wait` blocked for the device
        on_gpu = self.device.type == "cuda"
        # Sampled tokens come back through two pinned buffers, used in turn: step N+1 may
        # be launched before step N's tokens are read.
        self.token_host = torch.zeros(2, config.max_num_seqs, dtype=torch.int64, pin_memory=on_gpu)
        self.num_launched = 0
        self.last_tokens: torch.Tensor | None = None   # device tokens of the last launched step
        self.inputs_sent = None    # CUDA event: the last step's inputs have left the host buffer
        self.last_done = None      # CUDA event: the last launched step has finished
        self.plan_sent = None      # CUDA event: flashinfer's last plan has been uploaded
        backend = resolve_backend(config.attention_backend, self.device)
        # flashinfer plans each step on the host (plan_attention). Made before profiling, so
        # the KV pool is sized around its workspace.
        self.planner = None
        if backend == "flashinfer":
            self.planner = FlashInferPlanner(self.model.attention_layers(), self.block_size,
                                             self.dtype, config.max_num_seqs, self.max_blocks,
                                             self.device)
        self.num_blocks = self.allocate_kv_cache(self.profile())
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Eager where graphs are not safe: the torch reference backend reads sequence lengths
        # on the host. With tensor parallelism every rank captures the same sizes in the same
        # order, so the NCCL all-reduces inside are captured in step.
        if self.device.type == "cuda":
            self.warm_up()
        if self.device.type == "cuda" and not config.enforce_eager and backend != "torch":
            self.capture_graphs()

    # ---- startup --------------------------------------------------------------------

    @torch.inference_mode()
    def profile(self) -> int:
        """Run the largest step the scheduler can produce (no KV cache yet, so attention
        reads only the step's own K/V) and return its peak activation bytes. On the CPU
        nothing is measured (the pool size is given or fixed), so nothing is run."""
        if self.device.type != "cuda":
            return 0
        cfg = self.config
        seq_len = min(cfg.max_num_batched_tokens, cfg.max_model_len)
        num_seqs = max(1, min(cfg.max_num_batched_tokens // seq_len, cfg.max_num_seqs))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        # top-k/top-p: the sampler's sort is part of the peak
        params = [SamplingParams(top_k=50, top_p=0.9)] * num_seqs
        step = self.prepare(dummy_batch([(seq_len, seq_len)] * num_seqs, self.block_size), params)
        self.buffer.upload(step.nbytes)
        self.forward(step)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        current = torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()   # else the freed activations count again as "used"
        return peak - current

    def allocate_kv_cache(self, activation_bytes: int) -> int:
        """Size the KV pool from what memory is left, allocate ONE tensor
        [2, layers, blocks, block_size, kv_heads, head_dim] and give each attention layer
        its K and V views."""
        cfg, mc = self.config, self.model_config
        layers = self.model.attention_layers()
        kv_heads = mc.num_kv_heads_per_rank(self.tp_size)
        block_bytes = (2 * len(layers) * cfg.block_size * kv_heads * mc.head_dim
                       * self.dtype.itemsize)
        if cfg.num_gpu_blocks is not None:
            num_blocks = cfg.num_gpu_blocks
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * cfg.gpu_memory_utilization - used - activation_bytes
            num_blocks = int(budget // block_bytes)
        else:
            num_blocks = min(CPU_KV_BYTES // block_bytes, cfg.max_num_seqs * self.max_blocks)
        if self.tp_size > 1:    # every rank must hold the same pool
            n = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            num_blocks = int(n.item())
        if num_blocks < self.max_blocks:
            has = max(num_blocks, 0)
            raise ValueError(
                f"the KV cache has room for {has} blocks ({size(has * block_bytes)}) but one "
                f"max_model_len={cfg.max_model_len} request needs {self.max_blocks} blocks of "
                f"{cfg.block_size} tokens ({size(self.max_blocks * block_bytes)}): lower "
                "max_model_len, raise gpu_memory_utilization or num_gpu_blocks, or use more "
                "tensor parallelism")
        self.kv_cache = torch.zeros(2, len(layers), num_blocks, cfg.block_size, kv_heads,
                                    mc.head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        return num_blocks

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Build, before the first request, the compiled variants that eager steps pick by
        shape: the Triton prefill tile heights, split-KV decode or not, torch.compile's
        dynamic-shape graphs. Else they compile in the middle of a run (0.5-1 s each on an
        H200). Runs eager steps over dummy block 0, whose junk K/V no request ever reads:
        every slot is written before it is attended to."""
        long = max(2, min(self.config.max_model_len - 1, self.config.max_num_batched_tokens // 2))
        shapes = (                           # (context length, new tokens) per sequence
            [(3, 3)],                        # a short prompt: the short prefill tile
            [(long, long)],                  # a long prompt: the full tile
            [(long, 1), (2, 1), (17, 17)],   # mixed: decodes at long context (split-KV) + prefill
            [(2, 1)] * 3 + [(5, 5)],         # mixed: short decodes (one split) + prefill
            [(2, 1)] * 16,                   # eager decode; the sampler's wide-batch tile
        )
        # sampling with a temperature: the fused sampler kernel's variants compile here too
        warm = SamplingParams(temperature=1.0)
        cfg = self.config
        for shape in shapes:
            if (len(shape) > cfg.max_num_seqs or sum(n for _, n in shape) > cfg.max_num_batched_tokens
                    or max(c for c, _ in shape) > cfg.max_model_len):
                continue   # a step this configuration can never produce
            self.execute(dummy_batch(shape, self.block_size), [warm] * len(shape))

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """One CUDA graph per decode batch size, largest first, sharing one memory pool.
        Each graph runs the model body; logits and sampling stay eager (their inputs are
        only the sampled rows)."""
        self.graph_sizes = graph_batch_sizes(self.config.max_num_seqs)
        pool = None
        for bs in reversed(self.graph_sizes):
            step = self.prepare(dummy_batch([(1, 1)] * bs, self.block_size), None)
            assert step.graph_bs == bs
            self.buffer.upload(step.nbytes)
            views = self.buffer.views(step.T, step.B, step.W, step.S)[2]
            input_ids, positions, meta = self.model_inputs(step, views)
            self.model(input_ids, positions, meta)        # warm-up: JIT, autotune, allocator
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                hidden = self.model(input_ids, positions, meta)
            pool = pool or graph.pool()
            self.graphs[bs] = (graph, hidden)
            torch.cuda.synchronize(self.device)

    # ---- one step -------------------------------------------------------------------

    def execute(self, batch: Batch, sampling_params: list[SamplingParams] | None = None) -> list[int]:
        """Run one step; returns one token per `batch.seqs` entry (-1 where nothing is
        sampled). `sampling_params[i]` goes with `batch.seqs[i]` (None: all greedy)."""
        return self.wait(self.launch(batch, sampling_params))

    def launch(self, batch: Batch, sampling_params: list[SamplingParams] | None = None,
               pending: dict | None = None) -> Launched:
        """Pack, upload and queue one step (model, logits, sampling, tokens -> host); does
        not wait for the device. `pending`: see the class docstring."""
        if self.inputs_sent is not None:   # the host buffer is about to be rewritten
            self.inputs_sent.synchronize()
        step = self.prepare(batch, sampling_params, pending)
        if self.tp_size > 1:
            self.set_header(step.header(RUN))
        cuda = self.device.type == "cuda"
        begin = None
        if cuda:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        self.buffer.upload(step.nbytes)        # the step's one host -> device copy
        if self.tp_size > 1:
            self.broadcast(step)
        if cuda:
            self.inputs_sent = torch.cuda.Event()
            self.inputs_sent.record()
        start = time.perf_counter()
        tokens = self.forward(step)
        host = None
        if tokens is not None:
            host = self.token_host[self.num_launched % 2, :step.S]
            host.copy_(tokens, non_blocking=True)
        order = step.order    # batch index of each sampled row
        sampled = [order[row] for row in step.sampled] if order else step.sampled
        pending = {batch.seqs[i].seq_id: k for k, i in enumerate(sampled)}
        launched = Launched(sampled, len(batch), host, pending, begin, previous=self.last_done)
        if cuda:
            launched.done = self.last_done = torch.cuda.Event(enable_timing=True)
            launched.done.record()
        else:   # the forward itself was the device work
            launched.device_s = time.perf_counter() - start
        self.num_launched += 1
        self.last_tokens = tokens
        return launched

    def wait(self, launched: Launched) -> list[int]:
        """Block until a launched step's tokens are on the host; one per batch sequence, in
        batch order (-1 where nothing was sampled)."""
        start = time.perf_counter()
        if launched.done is not None:
            launched.done.synchronize()
            launched.device_s = launched.begin.elapsed_time(launched.done) / 1e3
            if launched.previous is not None:
                launched.gap_s = max(0.0, launched.previous.elapsed_time(launched.begin) / 1e3)
        self.wait_s = time.perf_counter() - start
        out = [-1] * launched.num_seqs
        if launched.host is not None:
            for i, token in zip(launched.sampled, launched.host.tolist()):
                out[i] = token
        return out

    def prepare(self, batch: Batch, sampling_params: list[SamplingParams] | None,
                pending: dict | None = None) -> Step:
        """Pack the batch into the host step buffer: decodes first, then the others.
        All per-token arrays are computed with numpy, not per-token Python."""
        q_lens, starts, seqs, samples = (batch.num_new_tokens, batch.num_computed_tokens,
                                         batch.seqs, batch.sample)
        B = len(seqs)
        order = None
        num_decode = q_lens.count(1)
        if q_lens[:num_decode].count(1) < num_decode:     # some decode sits behind a prefill
            order = [i for i in range(B) if q_lens[i] == 1] + [i for i in range(B) if q_lens[i] != 1]
            q_lens, starts = [q_lens[i] for i in order], [starts[i] for i in order]
            seqs, samples = [seqs[i] for i in order], [samples[i] for i in order]
            if sampling_params is not None:
                sampling_params = [sampling_params[i] for i in order]
        T = sum(q_lens)
        q = np.array(q_lens, dtype=np.int64)
        start = np.array(starts, dtype=np.int64)
        ctx = start + q
        num_ctx_blocks = (ctx + self.block_size - 1) // self.block_size
        graph_bs = 0
        if num_decode == B and self.graph_sizes and B <= self.graph_sizes[-1]:
            graph_bs = next(s for s in self.graph_sizes if s >= B)
        rows = graph_bs or B
        W = self.max_blocks if graph_bs else int(num_ctx_blocks.max())
        sampled = list(range(B)) if samples.count(True) == B else [j for j in range(B) if samples[j]]
        S = len(sampled)
        fixed = []   # sequences whose last input token the previous step sampled (still on the device)
        if pending:
            get = pending.get
            fixed = [i for i, (s, c, n) in enumerate(zip(seqs, starts, q_lens))
                     if c + n == s.num_tokens and get(s.seq_id) is not None]
        F = len(fixed)
        nbytes, host, _ = self.buffer.views(graph_bs or T, rows, W, S, F)
        (input_ids, positions, slot_mapping, context_lens, query_start_loc, block_tables,
         logits_rows, temperatures, top_k, top_p, fix_rows, fix_src) = host

        query_start_loc[0] = 0
        np.cumsum(q, out=query_start_loc[1:B + 1])
        context_lens[:B] = ctx
        self.block_tables.gather(seqs, num_ctx_blocks.tolist(), block_tables)
        if num_decode == B:
            input_ids[:B] = [s.token_ids[c] for s, c in zip(seqs, starts)]
            positions[:B] = start
            rows_of_tokens = np.arange(B)
        else:
            input_ids[:T] = np.fromiter(
                chain.from_iterable(s.token_ids[c:c + n] for s, c, n in zip(seqs, starts, q_lens)),
                np.int64, T)
            positions[:T] = np.arange(T) - np.repeat(query_start_loc[:B] - start, q)
            rows_of_tokens = np.repeat(np.arange(B), q)
        pos = positions[:T]
        blocks = block_tables[rows_of_tokens, pos // self.block_size]
        slot_mapping[:T] = blocks.astype(np.int64) * self.block_size + pos % self.block_size
        if graph_bs > B:   # padding rows: one token at position 0 that is never stored
            input_ids[B:], positions[B:], slot_mapping[B:] = 0, 0, -1
            context_lens[B:], block_tables[B:] = 1, 0
            query_start_loc[B + 1:] = np.arange(B + 1, graph_bs + 1)
        logits_rows[:] = query_start_loc[1:][sampled] - 1
        if F:
            fix_rows[:] = query_start_loc[1:][fixed] - 1
            fix_src[:] = [pending[seqs[i].seq_id] for i in fixed]
            input_ids[fix_rows] = 0      # the host holds a placeholder there
        sampling = None
        if self.rank == 0:
            sampling = self.pack_sampling(sampling_params, seqs, sampled,
                                          temperatures, top_k, top_p)
        return Step(graph_bs or T, rows, W, S, int(q.max()) if B else 0,
                    int(ctx.max()) if B else 0, num_decode, graph_bs, nbytes, F,
                    order, sampled, sampling)

    def pack_sampling(self, params, seqs, sampled, temperatures, top_k, top_p) -> SamplingTensors:
        """Per sampled row: temperature, top-k, top-p (numpy views into the step buffer),
        plus the host flags that choose the sampler's fast path."""
        vocab = self.model_config.vocab_size
        rows = [GREEDY] * len(sampled) if params is None else [params[j] for j in sampled]
        first = rows[0] if rows else GREEDY
        if all(p is first for p in rows):      # one SamplingParams for all: no per-row work
            temperatures[:] = first.temperature
            top_k[:] = first.top_k if first.top_k > 0 else vocab
            top_p[:] = first.top_p
            greedy = [first.greedy]
        else:
            temperatures[:] = [p.temperature for p in rows]
            top_k[:] = [p.top_k if p.top_k > 0 else vocab for p in rows]
            top_p[:] = [p.top_p for p in rows]
            greedy = [p.greedy for p in rows]
        # A seeded row's noise depends on its seed and on which output token it samples.
        seeds = []
        if len(greedy) > 1 or first.seed is not None:
            seeds = [(r, row_seed(p.seed, seqs[j].num_tokens - seqs[j].num_prompt_tokens))
                     for r, (j, p) in enumerate(zip(sampled, rows)) if p.seed is not None]
        return SamplingTensors(None, None, None, all_greedy=all(greedy), any_greedy=any(greedy),
                               use_top_k=bool((top_k < vocab).any()),
                               use_top_p=bool((top_p < 1).any()), seeds=seeds)

    def model_inputs(self, step: Step, views: list[torch.Tensor]):
        input_ids, positions, slot_mapping, context_lens, query_start_loc, block_tables = views[:6]
        # a graph serves every later batch of its size: let attention size for the longest
        max_context_len = self.config.max_model_len if step.graph_bs else step.max_context_len
        wrapper = self.plan_attention(step) if self.planner is not None else None
        meta = AttentionMetadata(slot_mapping=slot_mapping, block_tables=block_tables,
                                 context_lens=context_lens, query_start_loc=query_start_loc,
                                 max_query_len=step.max_query_len, max_context_len=max_context_len,
                                 num_decode_tokens=step.num_decode_tokens, wrapper=wrapper)
        return input_ids, positions, meta

    def plan_attention(self, step: Step):
        """flashinfer: plan this step's attention from the HOST copy of its inputs and
        return the wrapper to run (for a graph step, the wrapper its graph captured)."""
        if self.rank > 0:   # followers receive the step on the device only
            self.buffer.download(step.nbytes)
        host = self.buffer.views(step.T, step.B, step.W, step.S)[1]
        context_lens, query_start_loc, block_tables = host[3:6]
        if self.plan_sent is not None:   # the last plan's uploads read the pinned arrays we rewrite
            self.plan_sent.synchronize()
        wrapper = self.planner.plan(query_start_loc, context_lens, block_tables,
                                    step.num_decode_tokens, step.graph_bs)
        if self.device.type == "cuda":
            self.plan_sent = torch.cuda.Event()
            self.plan_sent.record()
        return wrapper

    @torch.inference_mode()
    def forward(self, step: Step) -> torch.Tensor | None:
        """Queue the model on the uploaded step, the logits of the sampled rows and (rank 0)
        sampling. Returns the sampled tokens (device, logits order; rank 0) or None. No sync."""
        views = self.buffer.views(step.T, step.B, step.W, step.S, step.F)[2]
        if step.F:   # input tokens the previous step sampled: device to device
            views[0].index_copy_(0, views[10], self.last_tokens.index_select(0, views[11]))
        if step.graph_bs:
            graph, hidden = self.graphs[step.graph_bs]
            if self.planner is not None:   # flashinfer: re-plan the graph's wrapper first
                self.plan_attention(step)
            graph.replay()
        else:
            hidden = self.model(*self.model_inputs(step, views))
        logits_rows, temperatures, top_k, top_p = views[6:10]
        if not step.S:
            return None
        logits = self.model.compute_logits(hidden.index_select(0, logits_rows))
        if self.rank != 0:
            return None
        sampling = step.sampling
        sampling.temperatures, sampling.top_k, sampling.top_p = temperatures, top_k, top_p
        return self.sampler(logits, sampling)

    # ---- tensor parallelism -----------------------------------------------------------

    def set_header(self, header: list[int]) -> None:
        self.buffer.header[:] = 0
        self.buffer.header[:len(header)] = header

    def broadcast(self, step: Step) -> None:
        """Rank 0: send the uploaded header, then the step's inputs, to the other ranks."""
        dist.broadcast(self.buffer.device[:HEADER_BYTES], src=0)
        dist.broadcast(self.buffer.device[HEADER_BYTES:step.nbytes], src=0)

    def stop_followers(self) -> None:
        """Rank 0: tell the other ranks to return from `follow`."""
        self.set_header([STOP])
        self.buffer.upload(HEADER_BYTES)
        dist.broadcast(self.buffer.device[:HEADER_BYTES], src=0)

    def follow(self) -> None:
        """Ranks > 0: run what rank 0 broadcasts until it says STOP."""
        while True:
            dist.broadcast(self.buffer.device[:HEADER_BYTES], src=0)
            header = self.buffer.device[:HEADER_BYTES].view(torch.int64).tolist()
            if header[0] == STOP:
                return
            step = Step.from_header(header)
            dist.broadcast(self.buffer.device[HEADER_BYTES:step.nbytes], src=0)
            self.forward(step)


def size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def dummy_batch(shape: list[tuple[int, int]], block_size: int) -> Batch:
    """A batch of all-zero sequences, one per (context length, new tokens) in `shape`, each
    computing its last `new tokens` and sampling (profiling, warm-up, graph capture), over
    dummy block 0: the caches are empty or the slots are junk either way."""
    seqs = [Sequence(i, [0] * ctx, 1) for i, (ctx, _) in enumerate(shape)]
    for s in seqs:
        s.block_table = [0] * -(-s.num_tokens // block_size)
    new = [n for _, n in shape]
    return Batch(seqs=seqs, num_new_tokens=new, num_computed_tokens=[c - n for c, n in shape],
                 sample=[True] * len(seqs), num_batched_tokens=sum(new), num_prefill_tokens=sum(new))
