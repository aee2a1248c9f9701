"""A step's device inputs: how a policy Batch becomes the flat tensors the model reads.

Everything a step needs (token ids, positions, KV slots, per-sequence lengths, block tables,
prefill tile list, sampling parameters and noise seeds) is packed with numpy into ONE pinned
host buffer and sent with ONE copy; the device tensors are typed views into its twin. The
layout is a function of the step's padded shape only, so a CUDA graph captured for a shape
finds its inputs at the same addresses in every later step of that shape.

Asynchronous scheduling: an input token that the previous step sampled and the host has not
seen yet is packed as the negative id -1 - k, k its index among that step's sampled tokens;
the step itself reads it from the device (`take_pending`), so no host work waits for it.

Which shape a step gets is policy.cuda_graphs' rule (shared with the simulator): decode
graphs pad the batch to a captured size, mixed graphs pad the tokens (and leave room for
min(size, max_num_seqs) sequences), larger steps run eagerly at their exact shape.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.kernels.launch import check_kernel_rule, decode_work_capacity, plan_decode_work
from engine.sampler import SamplingTensors, philox_inputs, row_seed
from engine.sampling_params import SamplingParams
from policy import Batch, Sequence
from policy.cuda_graphs import graph_rows
from policy.decode_plan import DecodePlan

ALIGN = 256                     # byte alignment of each input inside the step buffer
HEADER_SLOTS = 16               # int64 slots at the front of the step buffer (TP control)
HEADER_BYTES = HEADER_SLOTS * 8
GREEDY = SamplingParams(temperature=0.0)

# The step's inputs, in buffer order: name, numpy dtype, shape in terms of T (tokens),
# B (sequences), W (block-table width), P (prefill tiles), D (decode work items: the
# split-KV plan of engine.kernels.launch.plan_decode_work) and S (sampled rows: a graph
# step's padded row count, so that the graph's sampler finds them at fixed addresses too).
FIELDS = (
    ("input_ids", np.int64, "T"),
    ("positions", np.int64, "T"),
    ("slot_mapping", np.int64, "T"),
    ("context_lens", np.int32, "B"),
    ("query_start_loc", np.int32, "B+1"),
    ("block_tables", np.int32, "B,W"),
    ("prefill_tiles", np.int32, "P,2"),   # (sequence, query tile) per prefill program
    ("decode_work", np.int32, "D,4"),     # (sequence, first, end, shares) per split-KV item
    ("decode_index", np.int32, "B,2"),    # (first item, shares) per decode sequence
    ("logits_rows", np.int64, "S"),       # row of each sampled sequence's last token
    ("temperatures", np.float32, "S"),
    ("top_k", np.int64, "S"),
    ("top_p", np.float32, "S"),
    ("philox_seeds", np.int64, "S"),      # the fused sampler's noise per row
    ("philox_offsets", np.int64, "S"),
)
LOGITS_ROWS = 9                           # index of the first sampling field in FIELDS
TORCH_DTYPES = {np.int64: torch.int64, np.int32: torch.int32, np.float32: torch.float32}


def layout(T: int, B: int, W: int, P: int, D: int, S: int) -> tuple[list[tuple[int, tuple]], int]:
    """Byte offset and shape of each field (after the header), and the total size."""
    dims = {"T": (T,), "B": (B,), "B+1": (B + 1,), "B,W": (B, W), "P,2": (P, 2), "D,4": (D, 4),
            "B,2": (B, 2), "S": (S,)}
    spans, offset = [], HEADER_BYTES
    for _, dtype, dim in FIELDS:
        shape = dims[dim]
        spans.append((offset, shape))
        offset += -(-math.prod(shape) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    return spans, offset


class StepBuffer:
    """Pinned host staging memory and its device twin. Each step's inputs are written into
    the host side and sent with ONE copy; the device tensors are typed views into the twin."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, max_tiles: int,
                 max_work: int, device: torch.device):
        nbytes = layout(max_tokens, max_seqs, max_blocks, max_tiles, max_work, max_seqs)[1]
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=on_gpu)
        self.host_np = self.host.numpy()
        self.device = torch.zeros(nbytes, dtype=torch.uint8, device=device) if on_gpu else self.host
        self.header = self.host_np[:HEADER_BYTES].view(np.int64)
        self.max_tokens = max_tokens
        self.cache: dict[tuple, tuple] = {}   # shapes -> (nbytes, host views, device views)

    def views(self, T: int, B: int, W: int, P: int, D: int, S: int
              ) -> tuple[int, list[np.ndarray], list[torch.Tensor]]:
        """Size and (numpy, torch) views of each field for these shapes. Cached: making
        a dozen views costs more than packing a decode step."""
        key = (T, B, W, P, D, S)
        found = self.cache.get(key)
        if found is None:
            if len(self.cache) >= 4096:
                self.cache.clear()
            spans, nbytes = layout(T, B, W, P, D, S)
            sizes = [math.prod(shape) * np.dtype(dt).itemsize for (_, shape), (_, dt, _) in zip(spans, FIELDS)]
            host = [self.host_np[o:o + n].view(dt).reshape(shape)
                    for (o, shape), n, (_, dt, _) in zip(spans, sizes, FIELDS)]
            # Never inference tensors: the first call for a shape may come from warm-up or
            # graph capture (inference mode), and a dtype view made there could not be
            # written outside it (TP's rank 0 writes the resolved pending tokens in place).
            with torch.inference_mode(False):
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
    """Host-side facts about one packed step (its tensors are in the StepBuffer).
    `graph` is "decode" / "mixed" (replay the graph captured for that kind and size T) or
    "eager"; T, B, W, P, D, S are the padded shapes the buffer holds (S: sampling rows; a
    graph step samples B rows, `sampled` says which are real)."""
    T: int
    B: int
    W: int
    P: int
    S: int
    max_query_len: int
    max_context_len: int
    num_decode_tokens: int
    decode_rows: int                       # sequences the decode kernel scans
    D: int                                 # decode work items (split-KV plan capacity)
    graph: int                             # 0 eager, 1 decode graph, 2 mixed graph
    nbytes: int
    F: int = 0                             # input tokens the previous step sampled (take_pending)
    resample: int = 0                      # a graph step with top-k/top-p: sampled again after replay
    num_tokens: int = 0                    # real (unpadded) tokens
    order: list[int] | None = None         # batch index of each packed row (None: identity)
    sampled: list[int] | None = None       # packed rows that sample, in logits order
    sampling: SamplingTensors | None = None

    HEADER_FIELDS = 15

    def header(self, cmd: int) -> list[int]:
        return [cmd, self.T, self.B, self.W, self.P, self.S, self.max_query_len, self.max_context_len,
                self.num_decode_tokens, self.decode_rows, self.D, self.graph, self.nbytes,
                self.F, self.resample]

    @classmethod
    def from_header(cls, h: list[int]) -> "Step":
        return cls(*h[1:Step.HEADER_FIELDS])

    @property
    def key(self) -> tuple[int, int]:
        """The CUDA graph this step replays: (kind, padded size)."""
        return self.graph, self.T


EAGER, DECODE_GRAPH, MIXED_GRAPH = 0, 1, 2
GRAPH_KINDS = {"eager": EAGER, "decode": DECODE_GRAPH, "mixed": MIXED_GRAPH}


class StepPacker:
    """Packs policy Batches into a StepBuffer (rank 0; other ranks receive the bytes).

    shape_of(...) decides a step's padded shape (the graph rule); pack(...) writes it.
    `decode_sizes` / `mixed_sizes` are the captured graph sizes (empty until captured:
    every step runs eagerly at its exact shape)."""

    def __init__(self, buffer: StepBuffer, block_size: int, max_blocks: int, max_num_seqs: int,
                 vocab_size: int, tile_tokens: int, decode_plan: DecodePlan, rank: int = 0, seed: int = 0):
        self.buffer, self.block_size, self.max_blocks = buffer, block_size, max_blocks
        self.max_num_seqs = max_num_seqs
        self.vocab_size, self.tile_tokens, self.rank = vocab_size, tile_tokens, rank
        # the split-KV plan (one rank's KV heads, the SMs, the rule: engine.kernel_plan may pin it)
        self.decode_plan = check_kernel_rule(decode_plan)
        self.decode_sizes: list[int] = []
        self.mixed_sizes: list[int] = []
        self.block_tables = BlockTableMirror(2 * max_num_seqs + 2, max_blocks)
        self.seed, self.sample_steps = seed, 0   # the sampler's engine-wide noise stream
        self.iota = np.arange(max(max_num_seqs, buffer.max_tokens) + 1, dtype=np.int64)
        self.iota_list = self.iota.tolist()

    def work_capacity(self, decode_rows: int) -> int:
        """Decode work items a step with this many decode rows can need (0: no decode)."""
        return decode_work_capacity(decode_rows, self.decode_plan) if decode_rows else 0

    def graph_shape(self, kind: int, size: int) -> tuple[int, int, int, int, int]:
        """(T, B, W, P, D) of a captured graph of this kind and size."""
        if kind == DECODE_GRAPH:
            return size, size, self.max_blocks, 0, self.work_capacity(size)
        rows = min(size, self.max_num_seqs)
        tiles = -(-size // self.tile_tokens) + rows
        return size, rows, self.max_blocks, tiles, self.work_capacity(rows)

    def pack(self, batch: Batch, sampling_params: list[SamplingParams] | None,
             pending: dict | None = None, graph: tuple[int, int] | None = None) -> Step:
        """Pack the batch into the host step buffer: decodes (q_len 1) first, then the
        others. All per-token arrays are computed with numpy, not per-token Python.
        `graph` = (kind, size) overrides the graph rule (capture; EAGER: the exact shape);
        the batch must fit that shape. Decode-only steps that run eagerly or replay a
        decode graph take `pack_decode`: the same bytes with a third of the numpy calls (the
        step that must be cheapest)."""
        B = len(batch.seqs)
        if batch.num_new_tokens.count(1) == B:
            if graph is None:
                kind, size = graph_rows(B, B, True, self.decode_sizes, self.mixed_sizes)
                graph = GRAPH_KINDS[kind], size
            if graph[0] != MIXED_GRAPH:   # (past the decode graphs, a mixed graph may take it)
                return self.pack_decode(batch, sampling_params, pending, graph)
        return self.pack_any(batch, sampling_params, pending, graph)

    def pack_decode(self, batch: Batch, sampling_params: list[SamplingParams] | None,
                    pending: dict | None, graph: tuple[int, int]) -> Step:
        """`pack_any` for a batch of decodes only (q_len 1 everywhere), eager or on a
        decode graph (`graph` = (EAGER, _) or (DECODE_GRAPH, size)): token i is sequence
        i's, at position num_computed_tokens[i]."""
        starts, seqs, samples = batch.num_computed_tokens, batch.seqs, batch.sample
        B, bs = len(seqs), self.block_size
        graph, size = graph
        if graph == MIXED_GRAPH:
            raise ValueError("pack_decode: a decode-only step on a mixed graph goes through pack_any")
        max_ctx = max(starts) + 1 if B else 0
        if graph:
            Tp, Bp, W, P, D = self.graph_shape(graph, size)
        else:
            Tp, Bp, W, P, D = B, B, max(1, -(-max_ctx // bs)), 0, self.work_capacity(B)
        sampled = self.iota_list[:B] if samples.count(True) == B else [j for j in range(B) if samples[j]]
        S = Bp if graph else len(sampled)
        nbytes, host, _ = self.buffer.views(Tp, Bp, W, P, D, S)
        (input_ids, positions, slot_mapping, context_lens, query_start_loc, block_tables,
         prefill_tiles, decode_work, decode_index, logits_rows) = host[:LOGITS_ROWS + 1]
        iota = self.iota
        # each sequence's last token, or -1 - k where the previous step sampled it (k: its
        # index there; the device fills it in)
        F = 0
        if pending:
            get = pending.get
            ids = [-1 - k if (k := get(s.seq_id)) is not None and c + 1 == s.num_tokens else s.token_ids[c]
                   for s, c in zip(seqs, starts)]
            input_ids[:B] = ids
            F = B - np.count_nonzero(input_ids[:B] >= 0)
        else:
            input_ids[:B] = [s.token_ids[c] for s, c in zip(seqs, starts)]
        start = positions[:B]
        start[:] = starts
        np.add(start, 1, out=context_lens[:B])
        query_start_loc[:B + 1] = iota[:B + 1]
        self.block_tables.gather(seqs, (start // bs + 1).tolist(), block_tables)
        slot_mapping[:B] = block_tables[iota[:B], start // bs].astype(np.int64) * bs + start % bs
        if Bp > B:
            self._pad(graph, B, B, Tp, Bp, input_ids, positions, slot_mapping, context_lens,
                      query_start_loc, block_tables)
        # the split-KV plan; a decode graph's padding rows too, so no row is left junk
        plan_decode_work(context_lens[:Bp], self.decode_plan, decode_work, decode_index)
        logits_rows[:len(sampled)] = iota[:B] if len(sampled) == B else sampled
        return self.finish(batch, sampling_params, seqs, sampled, host, graph,
                           Step(Tp, Bp, W, P, S, 1 if B else 0, max_ctx, B, Bp, D, graph, nbytes, F, 0, B))

    def pack_any(self, batch: Batch, sampling_params: list[SamplingParams] | None,
                 pending: dict | None = None, graph: tuple[int, int] | None = None) -> Step:
        """`pack` for any batch (prefill chunks, decodes, both)."""
        q_lens, starts, seqs, samples = (batch.num_new_tokens, batch.num_computed_tokens,
                                         batch.seqs, batch.sample)
        B = len(seqs)
        order = None
        num_decode = q_lens.count(1)
        if q_lens[:num_decode].count(1) < num_decode:     # some decode sits behind a prefill
            order = [i for i in range(B) if q_lens[i] == 1] + [i for i in range(B) if q_lens[i] != 1]
            q_lens, starts = [q_lens[i] for i in order], [starts[i] for i in order]
            seqs, samples = [seqs[i] for i in order], [samples[i] for i in order]
        T = sum(q_lens)
        q = np.array(q_lens, dtype=np.int64)
        start = np.array(starts, dtype=np.int64)
        ctx = start + q
        num_ctx_blocks = (ctx + self.block_size - 1) // self.block_size
        prefill = np.flatnonzero(q != 1)            # sequences on the prefill kernel
        tiles_per_seq = (q[prefill] + self.tile_tokens - 1) // self.tile_tokens
        num_tiles = int(tiles_per_seq.sum())

        if graph is None:
            kind, size = graph_rows(T, B, num_decode == B, self.decode_sizes, self.mixed_sizes)
            graph = GRAPH_KINDS[kind]
        else:
            graph, size = graph
        max_ctx = int(ctx.max()) if B else 0
        if graph:
            Tp, Bp, W, P, D = self.graph_shape(graph, size)
            decode_rows = Bp
        else:
            Tp, Bp, W, P = T, B, int(num_ctx_blocks.max()) if B else 1, num_tiles
            decode_rows = num_decode
            D = self.work_capacity(num_decode)
        sampled = list(range(B)) if samples.count(True) == B else [j for j in range(B) if samples[j]]
        S = Bp if graph else len(sampled)       # a graph samples all its rows
        fixed = []   # sequences whose last input token the previous step sampled (still on the device)
        if pending:
            get = pending.get
            fixed = [i for i, (s, c, n) in enumerate(zip(seqs, starts, q_lens))
                     if c + n == s.num_tokens and get(s.seq_id) is not None]
        nbytes, host, _ = self.buffer.views(Tp, Bp, W, P, D, S)
        (input_ids, positions, slot_mapping, context_lens, query_start_loc, block_tables,
         prefill_tiles, decode_work, decode_index, logits_rows, temperatures, top_k, top_p,
         philox_seeds, philox_offsets) = host

        query_start_loc[0] = 0
        np.cumsum(q, out=query_start_loc[1:B + 1])
        context_lens[:B] = ctx
        self.block_tables.gather(seqs, num_ctx_blocks.tolist(), block_tables)
        # the decodes (first, one token each), then each prompt chunk copied from a view of
        # its sequence's int64 buffer (a Python walk over a chunk's tokens cost ~0.6 us a
        # token: milliseconds for a long prompt, host time the device waits for)
        input_ids[:num_decode] = [s.token_ids[c] for s, c in zip(seqs[:num_decode], starts)]
        if num_decode == B:
            positions[:B] = start
            rows_of_tokens = np.arange(B)
        else:
            offset = num_decode
            for s, c, n in zip(seqs[num_decode:], starts[num_decode:], q_lens[num_decode:]):
                input_ids[offset:offset + n] = np.frombuffer(s.token_ids, np.int64, n, 8 * c)
                offset += n
            positions[:T] = np.arange(T) - np.repeat(query_start_loc[:B] - start, q)
            rows_of_tokens = np.repeat(np.arange(B), q)
        pos = positions[:T]
        blocks = block_tables[rows_of_tokens, pos // self.block_size]
        slot_mapping[:T] = blocks.astype(np.int64) * self.block_size + pos % self.block_size
        if P:
            seq_of_tile = np.repeat(prefill, tiles_per_seq)
            first_tile = np.repeat(np.cumsum(tiles_per_seq) - tiles_per_seq, tiles_per_seq)
            tile = np.arange(num_tiles) - first_tile
            # Heaviest first (causal: a tile's cost is the keys up to its last query), so the
            # longest programs start first and the short ones fill the GPU's tail.
            keys = start[seq_of_tile] + np.minimum(q[seq_of_tile], (tile + 1) * self.tile_tokens)
            heavy_first = np.argsort(-keys, kind="stable")
            prefill_tiles[:num_tiles, 0] = seq_of_tile[heavy_first]
            prefill_tiles[:num_tiles, 1] = tile[heavy_first]
            prefill_tiles[num_tiles:] = -1
        self._pad(graph, T, B, Tp, Bp, input_ids, positions, slot_mapping, context_lens,
                  query_start_loc, block_tables)
        if D:   # the split-KV plan; a decode graph's padding rows too, so no row is left junk
            n = Bp if graph == DECODE_GRAPH else num_decode
            plan_decode_work(context_lens[:n], self.decode_plan, decode_work, decode_index)
            decode_index[n:] = 0    # prefill and padding rows: nothing to merge
        logits_rows[:len(sampled)] = query_start_loc[1:][sampled] - 1
        if fixed:    # the host holds a placeholder there: name the device's token instead
            input_ids[query_start_loc[1:][fixed] - 1] = [-1 - pending[seqs[i].seq_id] for i in fixed]
        step = Step(Tp, Bp, W, P, S, int(q.max()) if B else 0, max_ctx, num_decode, decode_rows,
                    D, graph, nbytes, len(fixed), 0, T, order)
        return self.finish(batch, sampling_params, seqs, sampled, host, graph, step)

    def finish(self, batch, sampling_params, seqs, sampled, host, graph, step: Step) -> Step:
        """The sampling rows of a packed step, a graph's padding rows included: the logits
        rows on every rank (every rank's LM head reads them: a rank > 0 packs its own graph
        steps at capture), the sampling parameters on rank 0 (the only one that samples)."""
        step.sampled = sampled
        n = len(sampled)
        if n < step.S:    # a graph's padding rows: row 0, never read back. Else they hold
            # what earlier steps left in the buffer, rows past this step's tokens.
            host[LOGITS_ROWS][n:] = 0
        if self.rank != 0:
            return step
        if step.order is not None and sampling_params is not None:
            sampling_params = [sampling_params[i] for i in step.order]
        sampling = step.sampling = self.pack_sampling(sampling_params, seqs, sampled, host[LOGITS_ROWS + 1:])
        # a graph samples without top-k/top-p: such a step samples its rows again
        step.resample = int(bool(graph) and (sampling.use_top_k or sampling.use_top_p))
        if n < step.S:    # the padding rows sample greedily
            temperatures, top_k, top_p = host[LOGITS_ROWS + 1:LOGITS_ROWS + 4]
            temperatures[n:], top_k[n:], top_p[n:] = 0.0, self.vocab_size, 1.0
            sampling.any_greedy = True
        return step

    @staticmethod
    def _pad(graph, T, B, Tp, Bp, input_ids, positions, slot_mapping, context_lens,
             query_start_loc, block_tables) -> None:
        """Padding of a graph step. Decode graphs: each padding row is one token at position
        0 that is never stored (flashinfer's decode plan wants q_len 1 everywhere). Mixed
        graphs: padding tokens belong to no sequence and padding sequences have no query."""
        if not graph:
            return
        input_ids[T:], positions[T:], slot_mapping[T:] = 0, 0, -1
        block_tables[B:] = 0
        if graph == DECODE_GRAPH:
            context_lens[B:] = 1
            query_start_loc[B + 1:] = np.arange(B + 1, Bp + 1)
        else:
            context_lens[B:] = 0
            query_start_loc[B + 1:] = T

    def pack_sampling(self, params, seqs, sampled, fields) -> SamplingTensors:
        """Per sampled row: temperature, top-k, top-p and the fused sampler's Philox seed and
        offset (`fields`: numpy views into the step buffer, rows past len(sampled) left to
        the caller), plus the host flags that choose the sampler's path."""
        vocab, n = self.vocab_size, len(sampled)
        temperatures, top_k, top_p, philox_seeds, philox_offsets = (f[:n] for f in fields)
        if params is None:
            rows = [GREEDY] * n
        else:   # sampled is a sorted subset of the rows: all of them when as many
            rows = params if n == len(params) else [params[j] for j in sampled]
        first = rows[0] if rows else GREEDY
        if rows.count(first) == n:      # one SamplingParams for all (C-speed test): no per-row work
            temperatures[:] = first.temperature
            top_k[:] = first.top_k if first.top_k > 0 else vocab
            top_p[:] = first.top_p
            greedy = [first.greedy]
            use_top_k, use_top_p = 0 < first.top_k < vocab, first.top_p < 1
        else:
            temperatures[:] = [p.temperature for p in rows]
            top_k[:] = [p.top_k if p.top_k > 0 else vocab for p in rows]
            top_p[:] = [p.top_p for p in rows]
            greedy = [p.greedy for p in rows]
            use_top_k, use_top_p = bool((top_k < vocab).any()), bool((top_p < 1).any())
        # A seeded row's noise depends on its seed and on which output token it samples.
        seeds = []
        if len(greedy) > 1 or first.seed is not None:
            seeds = [(r, row_seed(p.seed, seqs[j].num_tokens - seqs[j].num_prompt_tokens))
                     for r, (j, p) in enumerate(zip(sampled, rows)) if p.seed is not None]
        all_greedy = all(greedy)
        if not all_greedy:   # the next seed of the engine-wide stream (greedy steps draw none)
            self.sample_steps += 1
            philox_inputs(self.seed, self.sample_steps, seeds, philox_seeds, philox_offsets)
        return SamplingTensors(None, None, None, all_greedy=all_greedy, any_greedy=any(greedy),
                               use_top_k=use_top_k, use_top_p=use_top_p, seeds=seeds)


def take_pending(input_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """input_ids with each pending entry -1 - k replaced by tokens[k] (the previous step's
    k-th sampled token, still on the device). Device ops only, no sync: a graph captures
    them, and they leave input_ids as they are when nothing is pending."""
    index = torch.bitwise_not(input_ids).clamp_(min=0)     # -1 - id: k where pending, else 0
    return torch.where(input_ids < 0, tokens.index_select(0, index), input_ids)


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
