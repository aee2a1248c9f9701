"""Executes the policy's batches on one device: load, capture, launch, wait. Each step's
inputs are packed by engine.step_inputs; the step's device work (`run_body`: pending input
tokens, model, logits rows, LM head, sampling into the device token buffer) runs by
replaying a CUDA graph (decode steps and mixed prefill+decode steps up to
`cuda_graph_max_tokens` tokens, padded to a captured size by policy.cuda_graphs' rule) or
eagerly (larger steps); one token per sequence is sampled. So a graphed step is: pack, one
upload, one replay, one device -> host copy. It makes no scheduling decision.

A step is `launch`ed (packed, uploaded, queued: no wait) and later `wait`ed for, so the
engine can schedule and launch step N+1 while step N runs (asynchronous scheduling).

Tensor parallelism: one ModelRunner per rank. Rank 0 packs the step's inputs and
broadcasts them; the other ranks (engine.distributed) receive them and run the same
forward, so no rank but 0 ever sees a Batch.
"""
import gc
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.kernels import buffers
from engine.layers import quant
from engine.layers.attention import AttentionMetadata, resolve_backend
from engine.layers.flashinfer_backend import FlashInferPlanner
from engine.layers.moe import choose_moe_tiles
from engine.loader import load_weights
from engine.models import ModelConfig, build_model, resolve_dtype
from engine.sampler import Sampler, SamplingTensors
from engine.sampling_params import SamplingParams
from engine.step_inputs import (DECODE_GRAPH, HEADER_BYTES, LOGITS_ROWS, MIXED_GRAPH, Step,
                                StepBuffer, StepPacker, dummy_batch, take_pending)
from policy import Batch
from policy.cuda_graphs import capture_sizes, decode_sizes, mixed_sizes
from policy.decode_plan import DecodePlan

CPU_KV_BYTES = 1 << 30          # default KV pool on the CPU (tests pass num_gpu_blocks)
RUN, STOP = 1, 2                # header[0]: what the followers do next


@dataclass(slots=True)
class Launched:
    """A step handed to the device. Its sampled tokens (one per `sampled` batch index, in
    logits order) stay in the runner's device token buffer `tokens`, where the next step
    reads its pending inputs; `pending` maps the seq_id of each sampled sequence to its
    index there; `host` receives them (pinned) and `done` fires when they have arrived.
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
                 device: torch.device | None = None, peers=None):
        self.config, self.model_config, self.rank = config, model_config, rank
        # rank 0 with tensor parallelism: the workers (engine.distributed.Workers), whose
        # failure `peers.check()` raises; checked at each launch and wait, so a step that a
        # dead worker cut short (its tokens junk) raises that worker's error, whoever drives
        self.peers = peers
        self.tp_size = config.tensor_parallel_size
        self.device = device or torch.device("cpu")
        self.dtype = resolve_dtype(model_config.dtype if config.dtype == "auto" else config.dtype)
        self.block_size = config.block_size
        self.max_blocks = -(-config.max_model_len // config.block_size)
        self.model = build_model(model_config, self.dtype, self.device, rank, self.tp_size,
                                 config.attention_backend, config.max_model_len)
        load_weights(self.model, config.model)
        self.sampler = Sampler(self.device, config.seed, fused=self.device.type == "cuda")
        self.packer = self.make_packer()
        self.buffer = self.packer.buffer
        self.wait_s = 0.0   # seconds the last `wait` blocked for the device
        on_gpu = self.device.type == "cuda"
        # Sampled tokens come back through two pinned buffers, used in turn: step N+1 may
        # be launched before step N's tokens are read.
        self.token_host = torch.zeros(2, config.max_num_seqs, dtype=torch.int64, pin_memory=on_gpu)
        self.num_launched = 0
        # The last launched step's sampled tokens, at one address for every step (graphs
        # write it, the next step's pending inputs read it)
        self.tokens = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        # the kernels' shared per-device buffers live while a runner on the device does
        self.holds_buffers = on_gpu
        if on_gpu:
            buffers.hold(self.tokens.device)
        self.inputs_sent = None    # CUDA event: the last step's inputs have left the host buffer
        self.last_done = None      # CUDA event: the last launched step has finished
        # Each step's (begin, inputs sent, done) events, reused in turn: at most two steps are
        # in flight, and a step's events are read before the fourth launch after it. Recorded
        # on the stream the runner was made on (torch.cuda.current_stream costs ~10 us a call).
        self.stream = torch.cuda.current_stream(self.device) if on_gpu else None
        self.events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(),
                        torch.cuda.Event(enable_timing=True)) for _ in range(4)] if on_gpu else []
        self.plan_sent = None      # CUDA event: flashinfer's last plan has been uploaded
        backend = resolve_backend(config.attention_backend, self.device)
        # a mixed step's decode attention beside its prefill attention (attention_stream)
        self.side_stream = (torch.cuda.Stream(self.device)
                            if on_gpu and backend == "triton" and config.attention_streams else None)
        # flashinfer plans each step on the host (plan_attention). Made before profiling, so
        # the KV pool is sized around its workspace.
        self.planner = None
        if backend == "flashinfer":
            self.planner = FlashInferPlanner(self.model.attention_layers(), self.block_size,
                                             self.dtype, config.max_num_seqs, self.max_blocks,
                                             self.device)
        # programmatic dependent launch for the step's Triton kernels (before the load-time
        # choices time them and the graphs capture them)
        self.pdl = None   # engine.kernels.pdl where supported (it needs Triton: CPU installs may lack it)
        if on_gpu and config.pdl_max_tokens:
            from engine.kernels import pdl
            self.pdl = pdl if pdl.supported(self.device) else None
        self.memory: dict = {}   # where the device's memory went when the pool was sized (CUDA: memory_report)
        self.num_blocks = self.allocate_kv_cache(self.profile())
        # the start-up kernel choices (skinny GEMM, fused MoE tiles, W4A16 launches), before
        # capture: timed, or read from EngineConfig.kernel_plan; their timing reports
        self.skinny_report, self.moe_report, self.quant_report = self.choose_kernels(backend)
        # (kind, size) -> (graph, its hidden rows of the sampled tokens: for `resample`)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        # Eager where graphs are not safe: the torch reference backend reads sequence lengths
        # on the host. With tensor parallelism every rank captures the same sizes in the same
        # order, so the NCCL all-reduces inside are captured in step.
        if self.device.type == "cuda":
            self.warm_up()
        if self.device.type == "cuda" and not config.enforce_eager and backend != "torch":
            # mixed steps need the triton kernels' tile list; flashinfer plans them eagerly
            self.capture_graphs(mixed=backend == "triton")
        self.check_peers()

    def release(self) -> None:
        """Drop the CUDA graphs, the KV cache and the weights, and return the freed memory to
        the device (LLMEngine.close): the runner cannot run steps afterwards."""
        self.graphs.clear()
        if self.holds_buffers:   # after the graphs that captured them
            buffers.release(self.tokens.device)
            self.holds_buffers = False
        self.model = self.kv_cache = self.tokens = self.planner = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def make_packer(self) -> StepPacker:
        from engine import kernel_plan
        from engine.kernels.launch import decode_work_capacity, prefill_tile_tokens
        cfg, mc = self.config, self.model_config
        kv_heads = mc.num_kv_heads_per_rank(self.tp_size)
        tile = prefill_tile_tokens(mc.num_attention_heads, mc.num_key_value_heads, self.dtype)
        sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
               if self.device.type == "cuda" else 132)
        # the split-KV rule: the engine's, or the one a kernel plan (or calibration) pins
        plan = DecodePlan(kv_heads, sms, **(kernel_plan.read_decode_rule(cfg.kernel_plan) or {}))
        max_tokens = max(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        buffer = StepBuffer(max_tokens, cfg.max_num_seqs, self.max_blocks,
                            -(-max_tokens // tile) + cfg.max_num_seqs,
                            decode_work_capacity(cfg.max_num_seqs, plan), self.device)
        return StepPacker(buffer, self.block_size, self.max_blocks, cfg.max_num_seqs,
                          mc.vocab_size, tile, plan, rank=self.rank, seed=cfg.seed)

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
        step = self.packer.pack(dummy_batch([(seq_len, seq_len)] * num_seqs, self.block_size), params)
        self.buffer.upload(step.nbytes)
        self.forward(step)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        current = torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()   # else the freed activations count again as "used"
        return peak - current

    def allocate_kv_cache(self, activation_bytes: int) -> int:
        """Size the KV pool from what memory is left, allocate ONE tensor
        [2, layers, blocks, block_size, kv_heads, head_dim] (EngineConfig.kv_cache_init's
        contents) and give each attention layer its K and V views."""
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
            self.memory = memory_report(total, free, torch.cuda.memory_allocated(self.device),
                                        torch.cuda.memory_reserved(self.device), activation_bytes,
                                        max(num_blocks, 0) * block_bytes, cfg.gpu_memory_utilization)
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
        if cfg.kv_cache_init == "random":
            gen = torch.Generator(self.device).manual_seed(cfg.seed + self.rank)
            self.kv_cache.normal_(generator=gen)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        return num_blocks

    def choose_kernels(self, backend: str) -> tuple[list, list, list]:
        """Set the start-up kernel choices: the skinny GEMM's (CUDA graphs on, bf16 / fp16
        layers), the fused MoE tiles and the W4A16 launches. From EngineConfig.kernel_plan
        where that file exists (nothing timed; on the CPU too where the Triton backend
        interprets the kernels, TRITON_INTERPRET=1), else timed on CUDA and, where a file is
        named, written there by rank 0. Returns the (skinny, moe, w4a16) timing reports ([]
        where read from a file or not timed)."""
        from engine import kernel_plan
        cfg, on_gpu = self.config, self.device.type == "cuda"
        pdl_rows = cfg.pdl_max_tokens if self.pdl else 0
        skinny = (on_gpu and cfg.skinny_gemm and cfg.cuda_graph_max_tokens
                  and not cfg.enforce_eager and backend != "torch")
        parts = [p for p, on in (("skinny", skinny), ("moe", backend != "torch"),   # fused MoE
                                 ("w4a16", on_gpu or backend != "torch")) if on]
        path = cfg.kernel_plan
        device = torch.cuda.get_device_name(self.device) if on_gpu else "cpu"
        plan = kernel_plan.read(path) if path and parts else None
        if plan is not None:
            kernel_plan.apply(self.model, plan, device, path, self.device.type, parts, pdl_rows)
            return [], [], []
        if not on_gpu:
            return [], [], []
        from engine.kernels.skinny_gemm import choose_skinny_gemm   # Triton: CUDA only here
        reports = (choose_skinny_gemm(self.model, pdl_rows=pdl_rows) if skinny else [],  # with PDL as graphs launch
                   choose_moe_tiles(self.model, cfg.max_num_batched_tokens),   # bf16 / fp16 experts
                   quant.choose_kernels(self.model, pdl_rows))                 # 4-bit layers
        if path and self.rank == 0:
            kernel_plan.write(path, kernel_plan.snapshot(self.model, device, decode=self.packer.decode_plan))
        return reports

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Build, before the first request, the compiled variants that eager steps pick by
        shape: the Triton prefill tile heights, split-KV decode or not, torch.compile's
        dynamic-shape graphs. Else they compile in the middle of a run (0.5-1 s each on an
        H200). Runs eager steps over dummy block 0, whose junk K/V no request ever reads:
        every slot is written before it is attended to."""
        long = max(2, min(self.config.max_model_len - 1, self.config.max_num_batched_tokens // 2))
        cfg = self.config
        shapes = [                           # (context length, new tokens) per sequence
            [(3, 3)],                        # a short prompt: the short prefill tile
            [(long, long)],                  # a long prompt: the full tile
            [(long, 1), (2, 1), (17, 17)],   # mixed: decodes at long context (split-KV) + prefill
            [(2, 1)] * 3 + [(5, 5)],         # mixed: short decodes (one split) + prefill
        ]
        # The LM head and the sampler run eagerly after the model in eager steps, and again
        # after the replay in graph steps with top-k/top-p (over the graph's padded rows; a
        # graph's own variants compile at its capture). Their compiled variants follow the
        # sampled rows (the skinny GEMM's plan entry, one per capture size up to its 64 rows,
        # and row tile; the sampler's tile) and PDL (on in steps of at most pdl_max_tokens
        # tokens): every plan size as a decode step and with a prompt chunk past
        # pdl_max_tokens (a plan size that only a run's mixed steps met compiled mid-run)
        chunk = cfg.pdl_max_tokens + 8
        for rows in capture_sizes(64):
            shapes += [[(2, 1)] * rows, [(2, 1)] * (rows - 1) + [(chunk, chunk)]]
        # sampling with a temperature: the fused sampler kernel's variants compile here too
        warm = SamplingParams(temperature=1.0)
        for shape in shapes:
            if (len(shape) > cfg.max_num_seqs or sum(n for _, n in shape) > cfg.max_num_batched_tokens
                    or max(c for c, _ in shape) > cfg.max_model_len):
                continue   # a step this configuration can never produce
            self.execute(dummy_batch(shape, self.block_size), [warm] * len(shape))

    @torch.inference_mode()
    def capture_graphs(self, mixed: bool = True) -> None:
        """One CUDA graph per (kind, size) of policy.cuda_graphs, largest first, sharing one
        memory pool: decode graphs per batch size, mixed graphs per token count. Each graph
        captures the whole step (`graph_body`): pending tokens, model, logits rows, LM head
        and the fused sampler."""
        pool = None
        for kind, size in self.graph_keys(mixed):
            step, body = self.graph_body(kind, size)
            self.use_pdl(step.T)                          # the graph captures the launch attribute
            body()                                        # warm-up: JIT, allocator
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                rows = body()
            pool = pool or graph.pool()
            self.graphs[(kind, size)] = (graph, rows)
            torch.cuda.synchronize(self.device)
        if self.pdl is not None:
            self.pdl.enable(False)
        self.packer.decode_sizes = sorted(s for k, s in self.graphs if k == DECODE_GRAPH)
        self.packer.mixed_sizes = sorted(s for k, s in self.graphs if k == MIXED_GRAPH)

    def graph_keys(self, mixed: bool = True) -> list[tuple[int, int]]:
        """(kind, size) of every graph `capture_graphs` captures, in its order: largest
        first (the smaller graphs then fit in the first one's memory pool)."""
        cfg = self.config
        limit = cfg.cuda_graph_max_tokens
        keys = [(DECODE_GRAPH, s) for s in decode_sizes(cfg.max_num_seqs, limit)]
        if mixed:
            keys += [(MIXED_GRAPH, s) for s in mixed_sizes(cfg.max_num_batched_tokens, limit)]
        return sorted(keys, key=lambda ks: -ks[1])

    def graph_body(self, kind: int, size: int):
        """(step, body) of the graph of this kind and size: `body()` runs `run_body` over the
        step buffer's views of that shape (their addresses are what the graph captures) with
        the fused sampler, and returns the hidden rows it sampled from. CUDA captures it; a
        CPU test calls it as its replay."""
        step = self.graph_step(kind, size)
        self.buffer.upload(step.nbytes)
        views = self.buffer.views(step.T, step.B, step.W, step.P, step.D, step.S)[2]
        inputs = self.model_inputs(step, views)
        temperatures, top_k, top_p, seeds, offsets = views[LOGITS_ROWS + 1:]
        sampling = SamplingTensors(temperatures, top_k, top_p, all_greedy=False, any_greedy=True,
                                   use_top_k=False, use_top_p=False, seeds=[],
                                   philox_seeds=seeds, philox_offsets=offsets)
        return step, lambda: self.run_body(inputs, views[LOGITS_ROWS], sampling, graphed=True)

    def graph_step(self, kind: int, size: int) -> Step:
        """Pack a dummy step of this graph's shape (its data is junk over block 0)."""
        if kind == DECODE_GRAPH:
            shape = [(1, 1)] * size
        else:   # prompts of at most max_model_len tokens adding up to `size` (or as many
            # tokens as max_num_seqs such prompts hold: the packer pads the rest)
            L, rows = self.config.max_model_len, min(size, self.config.max_num_seqs)
            total = min(size, rows * L)
            shape = [(min(L, total - i), min(L, total - i)) for i in range(0, total, L)]
        return self.packer.pack(dummy_batch(shape, self.block_size), None, graph=(kind, size))

    # ---- one step -------------------------------------------------------------------

    def execute(self, batch: Batch, sampling_params: list[SamplingParams] | None = None) -> list[int]:
        """Run one step; returns one token per `batch.seqs` entry (-1 where nothing is
        sampled). `sampling_params[i]` goes with `batch.seqs[i]` (None: all greedy)."""
        return self.wait(self.launch(batch, sampling_params))

    def launch(self, batch: Batch, sampling_params: list[SamplingParams] | None = None,
               pending: dict | None = None) -> Launched:
        """Pack, upload and queue one step (model, logits, sampling, tokens -> host); does
        not wait for the device. `pending`: see the class docstring."""
        self.check_peers()
        if self.inputs_sent is not None:   # the host buffer is about to be rewritten
            self.inputs_sent.synchronize()
        step = self.packer.pack(batch, sampling_params, pending)
        if self.tp_size > 1:
            self.set_header(step.header(RUN))
        cuda = self.device.type == "cuda"
        begin = sent = done = None
        if cuda:
            begin, sent, done = self.events[self.num_launched % len(self.events)]
            begin.record(self.stream)
        self.buffer.upload(step.nbytes)        # the step's one host -> device copy
        if self.tp_size > 1:                   # followers hold no sampled tokens: resolve the
            if step.F:                         # pending inputs here, before the broadcast
                input_ids = self.buffer.views(step.T, step.B, step.W, step.P, step.D, step.S)[2][0]
                input_ids.copy_(take_pending(input_ids, self.tokens))
            self.broadcast(step)
        if cuda:
            sent.record(self.stream)
            self.inputs_sent = sent
        start = time.perf_counter()
        tokens = self.forward(step)
        sampled = step.sampled
        host = None
        if tokens is not None and sampled:
            host = self.token_host[self.num_launched % 2, :len(sampled)]
            host.copy_(tokens[:len(sampled)], non_blocking=True)
        if step.order:   # batch index of each sampled row
            sampled = [step.order[row] for row in sampled]
        pending = {batch.seqs[i].seq_id: k for k, i in enumerate(sampled)}
        launched = Launched(sampled, len(batch), host, pending, begin, previous=self.last_done)
        if cuda:
            done.record(self.stream)
            launched.done = self.last_done = done
        else:   # the forward itself was the device work
            launched.device_s = time.perf_counter() - start
        self.num_launched += 1
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
        self.check_peers()
        self.wait_s = time.perf_counter() - start
        out = [-1] * launched.num_seqs
        if launched.host is not None:
            for i, token in zip(launched.sampled, launched.host.tolist()):
                out[i] = token
        return out

    def model_inputs(self, step: Step, views: list[torch.Tensor]):
        (input_ids, positions, slot_mapping, context_lens, query_start_loc, block_tables, tiles,
         decode_work, decode_index) = views[:9]
        # a graph serves every later batch of its size: let attention size for the longest
        max_context_len = self.config.max_model_len if step.graph else step.max_context_len
        wrapper = self.plan_attention(step) if self.planner is not None else None
        meta = AttentionMetadata(slot_mapping=slot_mapping, block_tables=block_tables,
                                 context_lens=context_lens, query_start_loc=query_start_loc,
                                 max_query_len=step.max_query_len, max_context_len=max_context_len,
                                 num_decode_tokens=step.num_decode_tokens,
                                 decode_rows=step.decode_rows,
                                 prefill_tiles=tiles if step.P else None,
                                 decode_work=(decode_work, decode_index) if step.D else None,
                                 wrapper=wrapper, side_stream=self.attention_stream(step))
        return input_ids, positions, meta

    def attention_stream(self, step: Step):
        """The second stream of a step's attention (EngineConfig.attention_streams): for a
        step with decode rows and prompt tiles, not launched with programmatic dependent
        launch (its kernels wait on the one before in the same stream); else None."""
        if self.side_stream is None or not (step.P and step.decode_rows):
            return None
        pdl_step = self.pdl is not None and step.T <= self.config.pdl_max_tokens
        return None if pdl_step else self.side_stream

    def plan_attention(self, step: Step):
        """flashinfer: plan this step's attention from the HOST copy of its inputs and
        return the wrapper to run (for a graph step, the wrapper its graph captured)."""
        if self.rank > 0:   # followers receive the step on the device only
            self.buffer.download(step.nbytes)
        host = self.buffer.views(step.T, step.B, step.W, step.P, step.D, step.S)[1]
        context_lens, query_start_loc, block_tables = host[3:6]
        if self.plan_sent is not None:   # the last plan's uploads read the pinned arrays we rewrite
            self.plan_sent.synchronize()
        wrapper = self.planner.plan(query_start_loc, context_lens, block_tables,
                                    step.num_decode_tokens, step.T if step.graph == DECODE_GRAPH else 0)
        if self.device.type == "cuda":
            self.plan_sent = torch.cuda.Event()
            self.plan_sent.record()
        return wrapper

    def forward(self, step: Step) -> torch.Tensor | None:
        """Queue the step's device work on the uploaded step: a graph replay or `run_body`
        eagerly. Returns (rank 0) the device token buffer's first S rows, the sampled tokens
        in logits order, or None. No sync. A replay needs no inference mode (it runs no torch
        op); eager work enters it (~10 us a call: not on the graph path)."""
        views = self.buffer.views(step.T, step.B, step.W, step.P, step.D, step.S)[2]
        self.use_pdl(step.T)   # the eager launches below (a graph replays what it captured)
        sampling = step.sampling
        if sampling is not None:
            sampling.temperatures, sampling.top_k, sampling.top_p = views[LOGITS_ROWS + 1:LOGITS_ROWS + 4]
            sampling.philox_seeds, sampling.philox_offsets = views[LOGITS_ROWS + 4:]
        if step.graph:
            graph, rows = self.graphs[step.key]
            if self.planner is not None:   # flashinfer: re-plan the graph's wrapper first
                self.plan_attention(step)
            graph.replay()
            if step.resample:   # top-k/top-p, which the graph lacks: the LM head (every
                # rank: it gathers) and the sampler again, eagerly. Graph outputs keep only
                # these [S, hidden] rows: keeping every graph's logits would pin GBs.
                with torch.inference_mode():
                    logits = self.model.compute_logits(rows)
                    if self.rank == 0:
                        self.sampler(logits, sampling, out=self.tokens[:step.S])
        else:
            with torch.inference_mode():
                self.run_body(self.model_inputs(step, views), views[LOGITS_ROWS], sampling,
                              pending=step.F > 0)
        return self.tokens[:step.S] if self.rank == 0 and step.S else None

    def run_body(self, model_inputs, logits_rows: torch.Tensor, sampling: SamplingTensors | None,
                 graphed: bool = False, pending: bool = True) -> torch.Tensor | None:
        """A step's device work, in stream order: the pending input tokens from the token
        buffer (`take_pending`; skipped when `pending` is False), the model, the hidden
        rows of `logits_rows`, the LM head (every rank: its vocabulary slice, gathered), and
        on rank 0 sampling into `self.tokens[:S]` (`graphed`: the fused sampler, whatever
        the flags; the flags never change what a graph runs). Returns those hidden rows, or
        None when nothing is sampled. No host sync: this is what a CUDA graph captures."""
        input_ids, positions, meta = model_inputs
        if pending or graphed:
            input_ids = take_pending(input_ids, self.tokens)
        hidden = self.model(input_ids, positions, meta)
        S = logits_rows.shape[0]
        if not S:
            return None
        rows = hidden.index_select(0, logits_rows)
        logits = self.model.compute_logits(rows)
        if self.rank == 0:
            if graphed:
                self.sampler.sample_fused(logits, sampling, out=self.tokens[:S])
            else:
                self.sampler(logits, sampling, out=self.tokens[:S])
        return rows

    def use_pdl(self, num_tokens: int) -> None:
        """Launch the following Triton kernels with programmatic dependent launch iff a step
        of `num_tokens` tokens is small enough (EngineConfig.pdl_max_tokens): there the
        kernels are short and mostly latency, which PDL overlaps; in larger steps it measured
        slower (programs waiting early hold SM slots)."""
        if self.pdl is not None:
            self.pdl.enable(num_tokens <= self.config.pdl_max_tokens)

    # ---- tensor parallelism -----------------------------------------------------------

    def check_peers(self) -> None:
        """Rank 0: raise the error of a tensor-parallel worker that failed (an event test)."""
        if self.peers is not None:
            self.peers.check()

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


def memory_report(total: int, free: int, allocated: int, reserved: int, activation: int,
                  kv: int, utilization: float) -> dict:
    """Where the device's memory went when the KV pool was sized (bytes): `weights` (every
    tensor torch holds then: weights, buffers, scratch), `torch_cache` (torch's cached free
    blocks), `other` (the rest of what the device reports used: the CUDA context, loaded
    kernels' code and local memory, libraries' workspaces), `activation` (the largest step's
    peak), `kv` (the pool), and `unused` (the share 1 - gpu_memory_utilization plus what
    rounding to whole blocks leaves)."""
    used = total - free
    return {"total": total, "weights": allocated, "torch_cache": reserved - allocated,
            "other": used - reserved, "activation": activation, "kv": kv,
            "unused": total - used - activation - kv, "utilization": utilization}


def size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"
