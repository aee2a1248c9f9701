"""Calibrate the simulator on the engine, in one command:

    python run.py experiment=calibrate model=qwen3-0.6b hardware=h200 [engine.tensor_parallel_size=2 ...]

1. build the engine the config describes (the engine used by mode=gpu, same settings);
2. profile its ModelRunner over a grid of step shapes (simulator.calibrate.profile_grid:
   every CUDA-graph size of decode and mixed steps x KV context or cached prefix, decodes
   sharing a prefix's blocks, eager steps up to the token budget; for a mixture of experts
   also token counts between the graph sizes, random token ids so rows route as in
   serving, and a prompt chunk's cached prefix computed first: simulator.calibrate.moe_grid,
   `write_prefixes`) on dummy sequences (the features with the span of
   the engine's split-KV decode plan), sampled as the engine samples by default
   (temperature 1): per shape one warm-up run, one from an idle device (`device_idle_s`),
   and `calibrate.repeats` timed runs back to back, each launched while the one before runs,
   as asynchronous scheduling runs serving steps (device time from the runner's CUDA events,
   host time of its launch and wait: `time_shape`); every fourth shape of 512 prompt tokens
   or more also right after a run of light decode steps (`device_cool_s`, the GPU clock
   recovered: `time_cool`), every eighth shape after 50 ms of device idle (`device_cold_s`:
   `time_cold`), every sixteenth lighter one right after two heavy prompt steps
   (`device_hot_s`: `time_hot`), every launch recorded in order (`Timeline`: the history
   the fitted model's clock term is fitted on); plus the policy's own host time per step
   (schedule, update, receive on a Scheduler of that many sequences); then a short run of
   the engine's own step loop on synthetic requests (`serving_host`: the host window from
   forming a step to its launch, admissions timed apart; recorded as `host_serving`, the
   step records as <name>.serving.parquet);
3. fit the `fitted` cost model per step kind and, from the same profile, the roofline's
   efficiencies and overheads (simulator.calibrate), and print the error on held-out
   shapes per step kind;
4. write the calibration JSON (device, model, engine commit, command, engine settings),
   the profile next to it (<name>.profile.parquet: re-fit with `python -m
   simulator.calibrate`), its launch timeline (<name>.timeline.parquet) and the fitted
   hardware file (<name>.hardware.yaml).

Ends with one JSON line (the files and the held-out errors).

    python -m experiments.calibrate --host-serving-only model=qwen3-0.6b hardware=h200 [...]

re-measures only step 2's serving loop of the existing calibration file (its `host_serving`
and <name>.serving.parquet; the profile and the fits stay), on the engine the overrides
describe (give the ones the calibration was made with).

    python -m experiments.calibrate --block-cost 32,64 model=qwen3-0.6b hardware=h200 [...]

measures the model's attention cost at those KV block sizes against the profiled one, on the
engine's own steps, into the existing calibration (experiments.block_cost).
"""
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from omegaconf import DictConfig

from experiments import results
from experiments.config import RunConfig, build
from experiments.replay import build_engine, split_rule_line
from policy import Batch, CacheConfig, Scheduler, SchedulerConfig, Sequence
from simulator import CudaGraphs, FittedCostModel, ModelSpec
from simulator.clock import flops_per_unit
from simulator.calibrate import (SERVING_HOST_TERMS, clock_ratios, fit_calibration, fit_hardware,
                                 fit_serving_host, moe_held_out, moe_meta, moe_profile_columns, print_clock_ratios,
                                 print_fit, print_moe_held_out, print_step_errors, step_errors, write_hardware)
from simulator.profile_grid import moe_grid, profile_grid, random_token_ids, shape_batch

REPO = Path(__file__).resolve().parents[1]


def engine_graphs(rc: RunConfig, engine) -> CudaGraphs:
    """The CUDA graphs the engine replays steps from, by the shared rule (none on the CPU,
    with enforce_eager, or with the torch attention backend)."""
    runner = engine.model_runner
    eager = runner.device.type != "cuda" or rc.engine.attention_backend == "torch"
    limit = 0 if eager else rc.engine.graph_limit
    return CudaGraphs.for_engine(rc.scheduler.max_num_seqs, rc.scheduler.max_num_batched_tokens, limit)


def decode_folds() -> list[str]:
    """What the engine's decode attention launch folds in (TWINSERVE_DECODE_FOLD, read by
    engine.kernels.paged_attention at import): step costs differ with it."""
    import importlib
    try:    # (the package's `paged_attention` is the kernel's entry point, not the module)
        pa = importlib.import_module("engine.kernels.paged_attention")
    except ImportError:     # no Triton: the torch attention, nothing folded
        return []
    return [name for name, on in (("merge", pa.FOLD_SPLITS), ("qkv", pa.FOLD_QKV)) if on]


def pinned_plan(engine, device: str) -> dict | None:
    """The engine's kernel plan in engine.kernel_plan's format: the skinny GEMM's, and a
    quantized or MoE model's W4A16 launches and MoE tiles (None where no layer has one: the
    CPU, engine.skinny_gemm=false on a bf16 dense model, eager engines): a calibration
    records it, so `engine.kernel_plan=<calibration>` runs what its profile ran."""
    from engine import kernel_plan
    plan = kernel_plan.snapshot(engine.model_runner.model, device)
    pinned = any(g["plan"] for g in plan["skinny"].values()) or "w4a16" in plan or "moe" in plan
    return plan if pinned else None


def skinny_plan(engine) -> dict:
    """What the engine's linear layers run, per layer shape and row count
    (engine.kernel_plan.describe; empty on the CPU or with engine.skinny_gemm=false), whether
    the plan was timed at start or read from engine.kernel_plan."""
    from engine import kernel_plan
    return kernel_plan.describe(kernel_plan.snapshot(engine.model_runner.model, device=""))


def policy_host_times(rc: RunConfig, sizes: list[int], repeats: int = 20) -> dict[int, tuple[float, float]]:
    """Host seconds the policy spends per step with `n` running decodes, for each n in
    `sizes`: (schedule, update + receive), medians. The same Scheduler code the engine runs."""
    out = {}
    for n in sizes:
        cfg = SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=max(n, 16, rc.cache.block_size),
                              max_model_len=4096)
        sched = Scheduler(cfg, CacheConfig(block_size=rc.cache.block_size, enable_prefix_caching=True),
                          num_blocks=n * (64 // rc.cache.block_size + 2) + 8)
        for i in range(n):
            sched.add(Sequence(i, [1 + i], repeats + 2, ignore_eos=True))
        batch = sched.schedule(0.0)
        sched.update(batch, [1] * len(batch), 0.0)
        before, after = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            batch = sched.schedule(0.0)
            t1 = time.perf_counter()
            sched.update(batch, None, 0.0)
            sched.receive(batch, [1] * len(batch), 0.0)
            t2 = time.perf_counter()
            before.append(t1 - t0)
            after.append(t2 - t1)
        out[n] = (statistics.median(before), statistics.median(after))
    return out


def write_prefixes(runner, batch, max_tokens: int, sampling) -> int:
    """Compute the cached prefix of every prompt chunk of `batch` (an entry of more than one
    new token after computed ones) through the model, untimed, in chunks of at most
    `max_tokens`, so its KV blocks hold the model's keys and values rather than whatever the
    pool held. What a MoE step costs depends on it: measured on the H200 (Qwen3-30B-A3B,
    random weights), a 16-token chunk ran 5.2 ms fresh and 10.4 / 12.3 ms behind 512 / 1024
    tokens of unwritten KV, its tokens routed to more experts. Returns the tokens computed."""
    done = 0
    for seq, start, n in zip(batch.seqs, batch.num_computed_tokens, batch.num_new_tokens):
        if n <= 1 or start == 0:
            continue
        for first in range(0, start, max_tokens):
            chunk = min(max_tokens, start - first)
            prefix = Batch(seqs=[seq], num_new_tokens=[chunk], num_computed_tokens=[first],
                           sample=[False], num_batched_tokens=chunk, num_prefill_tokens=chunk,
                           block_size=batch.block_size, decode_plan=batch.decode_plan)
            runner.wait(runner.launch(prefix, [sampling], None))
            done += chunk
    return done


def pool_blocks_read(grid: list[dict], block_size: int, num_blocks: int, contiguous: bool) -> int:
    """The KV blocks the profile's shapes read: a contiguous layout hands out blocks 1, 2, ...
    to each shape afresh, so the largest shape's count (shared prefixes counted whole); a
    scattered one reads anywhere in the pool."""
    if not contiguous:
        return num_blocks
    largest = max(sum(-(-ctx // block_size) for ctx, *_ in p["shape"]) for p in grid)
    return min(num_blocks, largest + 1)


def write_kv_pool(runner, blocks: int, chunk_tokens: int, vocab_size: int, sampling, plan=None) -> int:
    """Fill blocks 1..`blocks` - 1 of the KV pool with keys and values the model computes:
    prompts of random token ids, `chunk_tokens` at a time, prefilled through the runner
    (untimed; every tensor-parallel rank follows; `plan`: the engine's decode plan). A
    serving engine's decodes read blocks its prefills wrote; the profile's shapes read
    blocks no step of theirs wrote, and what those hold sets the power a step draws: on
    the H200 Qwen3-0.6B decode steps over an all-zero pool ran 1-4% faster than over
    normal random values (probe_engines.py), and its serving steps sat between the two.
    Returns the tokens written."""
    block_size = runner.config.block_size
    per = max(1, chunk_tokens // block_size)
    done = 0
    for first in range(1, blocks, per):
        table = list(range(first, min(first + per, blocks)))
        n = len(table) * block_size
        batch = shape_batch([(n, n)], block_size, runner.num_blocks, plan, contiguous=True)
        batch.seqs[0].block_table = table
        batch.sample[0] = False
        random_token_ids(batch, vocab_size, seed=first)
        runner.wait(runner.launch(batch, [sampling], None))
        done += n
    return done


def time_shape(runner, batch, params, repeats: int, cuda: bool) -> tuple[list, float, list, list]:
    """Time one step shape as a serving engine with asynchronous scheduling runs its steps:
    each launched while the previous one runs, so its device time (CUDA events from its
    upload to its tokens' arrival) starts when the device reaches it, not when the host
    gets there. A warm-up launch (compilation, autotuning, first replay), one from an idle
    device (its time, with the host's launch latency inside, is returned apart), then
    `repeats` back to back. Returns (device seconds of the back-to-back launches, the idle
    launch's device seconds, host seconds of each launch, host seconds of each wait beyond
    waiting for the device)."""
    runner.wait(runner.launch(batch, params, None))             # warm-up
    device, launch, receive = [], [], []
    previous = runner.launch(batch, params, None)               # from an idle device
    idle_s = None
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        launched = runner.launch(batch, params, None) if r < repeats else None
        t1 = time.perf_counter()
        runner.wait(previous)
        t2 = time.perf_counter()
        if idle_s is None:
            idle_s = previous.device_s
        else:
            device.append(previous.device_s)
        receive.append(max(0.0, t2 - t1 - runner.wait_s))
        if launched is not None:
            # host work of the launch (on the CPU the forward runs inside it)
            launch.append(t1 - t0 - (0.0 if cuda else launched.device_s))
        previous = launched
    return device, idle_s, launch, receive


# The GPU clock under prompt steps (benchmarks/probe_transitions.py --stages recovery, H200,
# Llama-3.1-8B, 2,048-token chunks): back to back, as the grid times every shape, they run
# 6-14% slower than the first of a burst; after 4 decode steps (~26 ms) one runs 1.3% faster
# than that first, after 16 decodes 4% faster. Serving runs most prompt steps after decodes.
# So every COOL_EVERY-th shape with at least COOL_MIN_PROMPT_TOKENS prompt tokens is also
# timed cool (`device_cool_s`): right after COOL_STEPS light decode steps (COOL_BATCH decodes
# of COOL_CONTEXT tokens), each launched while the one before runs, `repeats` times, median.
COOL_MIN_PROMPT_TOKENS = 512
COOL_EVERY = 4
COOL_STEPS = 16
COOL_BATCH, COOL_CONTEXT = 8, 1024


# ... and after the device sat idle: on the H200 the SM clock idles at 345 MHz, and Qwen3-0.6B's
# real prompt steps launched after more than 5 ms of device idle ran 7.4% over their price
# (34 steps of session 13's replays), while the profile's one launch from an idle device
# (`device_idle_s`, right after a wait) ran 1.0% over back to back. So every COLD_EVERY-th
# shape is also timed after COLD_IDLE_S of idle (`device_cold_s`), median of `repeats`.
COLD_EVERY = 8
COLD_IDLE_S = 0.05


# ... and right after heavy prompt steps: the measured state the clock term of the fitted
# model (simulator.clock) has to price a decode after a burst of prompts by. Every HOT_EVERY-th
# shape of fewer than COOL_MIN_PROMPT_TOKENS prompt tokens is also timed right after HOT_STEPS
# prompt steps of a HOT_CHUNK-token fresh chunk (`device_hot_s`, median of `repeats`): on the
# H200 (Llama-3.1-8B) one such step already slows the next by 6% (raw/h200-s13/c1).
HOT_EVERY = 16
HOT_STEPS = 2
HOT_CHUNK = 2048


class Timeline:
    """The runner, with every step launched through it recorded in launch order: the shape
    (grid index) and phase it was launched for, whether it is that shape's own batch or a
    step around it (warm-up is the first own step of phase `back_to_back`, the launch from an
    idle device the second), the counts its compute follows (simulator.clock.step_flops) and,
    once waited on, the device idle before it (`gap_s`) and its device time (`device_s`).
    Written next to the profile (<name>.timeline.parquet): the fit of the clock term reads
    each timed step's recent history from it. A batch's counts are taken when it is named
    (`at`, `known`), outside the launches the profile times: inside them they would add
    to the host time it measures (session 15's Llama-3.1-8B profile has ~2 us per sequence
    of it)."""
    COUNTS = ("num_batched_tokens", "num_prefill_tokens", "num_sampled", "prefill_attention_pairs",
              "decode_context_tokens")

    def __init__(self, runner):
        self.runner, self.rows, self._index, self._counts = runner, [], {}, {}
        self.shape, self.phase, self.batch = -1, "", None

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def known(self, batch):
        """Take `batch`'s counts now (a batch launched around many shapes: light, heavy)."""
        f = batch.features()
        self._counts[id(batch)] = (batch, {k: f[k] for k in self.COUNTS})
        return batch

    def at(self, shape: int, phase: str, batch) -> "Timeline":
        if self.batch is not batch:     # (the last shape's batch is let go)
            if self.batch is not None and self._counts.get(id(self.batch), (None,))[0] is self.batch:
                del self._counts[id(self.batch)]
            self.known(batch)
        self.shape, self.phase, self.batch = shape, phase, batch
        return self

    def launch(self, batch, params, pending):
        launched = self.runner.launch(batch, params, pending)
        entry = self._counts.get(id(batch))
        if entry is None or entry[0] is not batch:   # a batch never named (a MoE prefix chunk:
            f = batch.features()                     # its launches are not timed)
            counts = {k: f[k] for k in self.COUNTS}
        else:
            counts = entry[1]
        self._index[id(launched)] = len(self.rows)
        self.rows.append({"shape": self.shape, "phase": self.phase, "own": batch is self.batch,
                          **counts, "gap_s": float("nan"), "device_s": float("nan")})
        return launched

    def wait(self, launched):
        out = self.runner.wait(launched)
        row = self.rows[self._index.pop(id(launched))]
        row["gap_s"], row["device_s"] = launched.gap_s, launched.device_s
        return out

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def time_cold(runner, batch, params, repeats: int) -> float:
    """Device seconds of `batch` launched after COLD_IDLE_S with nothing on the device,
    median of `repeats`."""
    times = []
    for _ in range(repeats):
        time.sleep(COLD_IDLE_S)
        launched = runner.launch(batch, params, None)
        runner.wait(launched)
        times.append(launched.device_s)
    return statistics.median(times)


def timed_sequence(runner, batches: list) -> list[float]:
    """Launch `batches` in order, each while the one before runs (one step in flight ahead of
    the one waited on, as serving and the profile run them), sampled with the engine's
    default; returns each one's device seconds. No warm-up: the caller runs one."""
    from engine import SamplingParams
    out, previous = [], None
    for batch in batches:
        launched = runner.launch(batch, [SamplingParams()] * len(batch.seqs), None)
        if previous is not None:
            runner.wait(previous)
            out.append(previous.device_s)
        previous = launched
    if previous is not None:
        runner.wait(previous)
        out.append(previous.device_s)
    return out


def time_hot(runner, batch, heavy, repeats: int) -> float:
    """Device seconds of `batch` launched right after HOT_STEPS launches of `heavy` (the
    launch while the last one runs), median of `repeats`."""
    return statistics.median(timed_sequence(runner, [heavy] * HOT_STEPS + [batch])[-1] for _ in range(repeats))


def time_cool(runner, batch, light, repeats: int) -> float:
    """Device seconds of `batch` launched right after COOL_STEPS launches of `light` (the
    light steps back to back, the shape launched while the last one runs), median of
    `repeats`. The shape was just timed hot (time_shape): nothing compiles here."""
    return statistics.median(timed_sequence(runner, [light] * COOL_STEPS + [batch])[-1] for _ in range(repeats))


def profiled_token_ids(rc: RunConfig, is_moe: bool) -> str:
    """The profiled steps' token ids: calibrate.token_ids, always "random" for a mixture of
    experts (all-zero ids route every row to the same k experts)."""
    return "random" if is_moe else rc.calibrate.token_ids


def profile(rc: RunConfig, engine, graphs: CudaGraphs, repeats: int,
            progress=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Time every grid shape on the engine's runner: one row per shape (medians), and the
    Timeline of every step launched."""
    from engine import SamplingParams
    runner = Timeline(engine.model_runner)
    cuda = runner.device.type == "cuda"
    grid = profile_grid(rc.scheduler.max_num_seqs, rc.scheduler.max_num_batched_tokens,
                        rc.scheduler.max_model_len, graphs)
    model = engine.model_config
    if model.is_moe:    # token counts between the graph sizes (simulator.calibrate: moe_grid)
        grid += moe_grid(rc.scheduler.max_num_seqs, rc.scheduler.max_num_batched_tokens,
                         rc.scheduler.max_model_len, graphs, model.num_experts, model.num_experts_per_tok)
    sizes = sorted({len(p["shape"]) for p in grid})
    policy = policy_host_times(rc, sizes)
    sampling = SamplingParams()   # the engine's default (temperature 1): what replays and
    # the server's default request sample with, through the fused sampler on the GPU
    plan = engine.decode_plan()       # the features get the span of the plan the kernel runs
    contiguous = rc.calibrate.kv_layout == "contiguous"
    light = shape_batch([(min(COOL_CONTEXT, rc.scheduler.max_model_len), 1)] * min(COOL_BATCH, rc.scheduler.max_num_seqs),
                        rc.cache.block_size, runner.num_blocks, plan, contiguous=contiguous)
    beside = min(COOL_BATCH, rc.scheduler.max_num_seqs - 1)    # the heavy step: a fresh chunk beside decodes
    chunk = min(HOT_CHUNK, rc.scheduler.max_num_batched_tokens - beside, rc.scheduler.max_model_len)
    heavy = shape_batch([(chunk, chunk)] + [(min(COOL_CONTEXT, rc.scheduler.max_model_len), 1)] * beside,
                        rc.cache.block_size, runner.num_blocks, plan, contiguous=contiguous)
    if rc.calibrate.kv_cache_init == "written":
        blocks = pool_blocks_read(grid, rc.cache.block_size, runner.num_blocks, contiguous)
        chunk_tokens = min(rc.scheduler.max_num_batched_tokens, rc.scheduler.max_model_len)
        started = time.perf_counter()
        written = write_kv_pool(engine.model_runner, blocks, chunk_tokens, model.vocab_size, sampling, plan)
        if progress:
            progress(f"KV pool: {written:,} tokens of blocks 1-{blocks - 1} written by the model "
                     f"({time.perf_counter() - started:.1f} s)")
    random_ids = profiled_token_ids(rc, model.is_moe) == "random"
    if random_ids:
        random_token_ids(heavy, model.vocab_size, seed=len(grid))
    runner.known(light), runner.known(heavy)
    heavy_seen = light_seen = 0
    rows, started = [], time.perf_counter()
    for k, point in enumerate(grid):
        batch = shape_batch(point["shape"], rc.cache.block_size, runner.num_blocks, plan, contiguous=contiguous)
        if random_ids:
            random_token_ids(batch, model.vocab_size, seed=k)
        if model.is_moe:
            # a chunk's cached prefix written as serving writes it: the router sees the
            # chunk's tokens through their attention over it
            write_prefixes(runner.at(k, "prefix", batch), batch, rc.scheduler.max_num_batched_tokens, sampling)
        params = [sampling] * len(batch.seqs)
        device, idle_s, launch, receive = time_shape(runner.at(k, "back_to_back", batch), batch, params,
                                                     repeats, cuda)
        cool_s, cold_s, hot_s = float("nan"), float("nan"), float("nan")
        if k % COLD_EVERY == 0:
            cold_s = time_cold(runner.at(k, "cold", batch), batch, params, repeats)
        if batch.num_prefill_tokens >= COOL_MIN_PROMPT_TOKENS:
            if heavy_seen % COOL_EVERY == 0:
                cool_s = time_cool(runner.at(k, "cool", batch), batch, light, repeats)
            heavy_seen += 1
        else:
            if light_seen % HOT_EVERY == 0 and chunk >= COOL_MIN_PROMPT_TOKENS:
                hot_s = time_hot(runner.at(k, "hot", batch), batch, heavy, repeats)
            light_seen += 1
        schedule_s, update_s = policy[len(batch.seqs)]
        f = batch.features()
        kind, padded = graphs.rows(f)
        rows.append({**f, "kind": kind, "rows": padded, "split": point["split"],
                     "grid": point.get("grid", "base"),
                     "shape": json.dumps(point["shape"]),   # so a later feature can be computed
                     "device_s": statistics.median(device),
                     "device_spread": (max(device) - min(device)) / statistics.median(device),
                     "device_idle_s": idle_s, "device_cool_s": cool_s, "device_cold_s": cold_s,
                     "device_hot_s": hot_s,
                     "host_launch_s": statistics.median(launch) + schedule_s,
                     "host_receive_s": statistics.median(receive) + update_s})
        if progress and (k + 1) % 25 == 0:
            progress(f"profiled {k + 1}/{len(grid)} shapes ({time.perf_counter() - started:.1f} s)")
    table = pd.DataFrame(rows)
    if model.is_moe:
        table = moe_profile_columns(table, model.num_experts, model.num_experts_per_tok)
    return table, runner.table()


SERVING_REQUESTS = 48   # the short run of the engine's step loop that times its host window
SERVING_OUTPUT = 24     # tokens each
# Requests added per turn of the loop, cycled: turns admitting 0, 1, 2 and 3 requests, so a
# step's admissions vary apart from its prompt chunks (a burst's prompts share a step or
# spill into the next; a prompt past the token budget is cut into chunks that admit nothing).
SERVING_BURSTS = (1, 0, 0, 2, 0, 0, 0, 3, 0, 0, 1, 0, 0, 0, 2, 0)


def serving_host(engine, max_prompt: int, seed: int = 0) -> pd.DataFrame:
    """The engine's own step loop on SERVING_REQUESTS synthetic requests (random token ids,
    prompts of 16 to `max_prompt` tokens spaced geometrically, in a fixed shuffled order,
    SERVING_OUTPUT tokens each), added SERVING_BURSTS[turn] at a time the way a replay admits
    arrivals: the clock is polled, the requests added (engine.add_request, timed), then the
    step formed at the polled time; the collector is frozen first, as a replay freezes it.
    Returns the step records it made (start_s, launch_s, ... as policy.StepLoop writes them)
    with `admitted` / `admitted_tokens` / `admit_time_s`: the requests and prompt tokens added
    in the turn that formed the step and the host seconds their add_request calls took. What
    the profile's launches leave out of a serving step's host window: admissions and the
    loop's own work (simulator.calibrate.fit_serving_host fits it)."""
    import gc
    import numpy as np
    from engine import SamplingParams
    rng = np.random.default_rng(seed)
    lengths = np.geomspace(16, max(16, max_prompt), SERVING_REQUESTS).astype(int)
    rng.shuffle(lengths)
    vocab = engine.model_config.vocab_size
    pending = [rng.integers(1, vocab, n).tolist() for n in lengths]
    params = SamplingParams(max_tokens=SERVING_OUTPUT, ignore_eos=True)
    first, added, turn = len(engine.step_records), {}, 0
    gc.collect()
    gc.freeze()
    try:
        while pending or engine.has_unfinished():
            now = engine.clock()
            tokens, t0 = [], time.perf_counter()
            for _ in range(min(len(pending), SERVING_BURSTS[turn % len(SERVING_BURSTS)])):
                prompt = pending.pop()
                engine.add_request(prompt, params)
                tokens.append(len(prompt))
            admit_s = time.perf_counter() - t0 if tokens else 0.0
            engine.step(now)
            if engine.loop.last_record is not None:
                added[id(engine.loop.last_record)] = (tokens, admit_s)
            turn += 1
    finally:
        gc.unfreeze()
    records = engine.step_records[first:]
    turns = [added.get(id(r), ((), 0.0)) for r in records]
    return pd.DataFrame(records).assign(admitted=[len(t) for t, _ in turns],
                                        admitted_tokens=[sum(t) for t, _ in turns],
                                        admit_time_s=[a for _, a in turns])


def measure_serving_host(rc: RunConfig, engine) -> pd.DataFrame:
    """serving_host on the engine `rc` describes, after a run of other requests (seed 1) that
    compiles and warms what its prompt shapes launch; returns the second run's steps."""
    max_prompt = min(rc.scheduler.max_model_len - SERVING_OUTPUT, rc.scheduler.max_num_batched_tokens)
    serving_host(engine, max_prompt, seed=1)
    return serving_host(engine, max_prompt, seed=0)


def remeasure_host_serving(cfg: DictConfig, overrides: list[str]) -> dict:
    """Re-measure only the serving loop's host window of an existing calibration (the file
    `calibrate.out` names, else the default path): build the engine, run measure_serving_host,
    write `host_serving` (with `host_serving_command` and `host_serving_commit`) into the
    calibration and the steps next to it (<name>.serving.parquet); the profile and the fits
    are left as they are. Returns the summary also printed as the last line."""
    rc = build(cfg)
    out, calib = existing_calibration(rc, "--host-serving-only")
    engine = build_engine(rc)
    try:
        serving = measure_serving_host(rc, engine)
    finally:
        engine.close()
    calib["host_serving"] = fit_serving_host(serving)
    calib["host_serving_command"] = "python -m experiments.calibrate --host-serving-only " + " ".join(overrides)
    calib["host_serving_commit"] = results.commit()
    FittedCostModel(calib, source=str(out))      # loads back
    out.write_text(json.dumps(calib, indent=2) + "\n")
    serving_path = out.with_suffix(".serving.parquet")
    serving.to_parquet(serving_path, index=False)
    hs = calib["host_serving"]
    print(f"host window of the engine's step loop ({hs['n']} steps of {SERVING_REQUESTS} requests): "
          + ", ".join(f"{name} {1e6 * hs[name]:.3g} us" for name in SERVING_HOST_TERMS))
    summary = {"calibration": str(out), "serving": str(serving_path), "steps": len(serving),
               "host_serving_us": {name: round(1e6 * hs[name], 3) for name in SERVING_HOST_TERMS}}
    print(json.dumps(summary))
    return summary


def device_name(rc: RunConfig) -> str:
    if rc.engine.device == "cuda":
        import torch
        return torch.cuda.get_device_name()
    import platform
    return f"cpu ({platform.processor() or platform.machine()})"


class Profiled(NamedTuple):
    """What profiling the engine gave: the profile (one row per shape), the launch timeline,
    the serving loop's host window, and the engine's settings as the calibration records them."""
    table: pd.DataFrame
    timeline: pd.DataFrame
    serving: pd.DataFrame
    graphs: CudaGraphs
    model: ModelSpec
    device: str
    decode_plan: object
    kernel_plan: dict | None
    startup_s: float
    profile_s: float


def calibrate(cfg: DictConfig, run_dir=None, overrides: list[str] | None = None) -> dict:
    """Profile, fit, write (see the module docstring). Returns the summary also printed as
    the last line."""
    rc = build(cfg)
    if rc.mode != "gpu":
        raise ValueError("calibration profiles the engine: use mode=gpu (experiment=calibrate sets it)")
    command = "python run.py " + " ".join(overrides if overrides is not None else sys.argv[1:])
    out = calibration_path(rc)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = profile_engine(rc)
    calib = fit(rc, run, command)
    summary = write(rc, run, calib, out)
    report(rc, run, calib, out, command, summary)
    print(json.dumps(summary))
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "calibration_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def profile_engine(rc) -> Profiled:
    """Start the engine, time the grid and the serving loop's host window, close it."""
    started = time.perf_counter()
    engine = build_engine(rc, kv_cache_init="random" if rc.calibrate.kv_cache_init == "random" else "zeros")
    try:
        startup_s = time.perf_counter() - started
        graphs = engine_graphs(rc, engine)
        plan = engine.decode_plan()       # the split rule the kernel runs (recorded with the profile)
        print(f"engine ready in {startup_s:.1f} s ({engine.model_runner.num_blocks} KV blocks, "
              f"{len(graphs.decode)} decode + {len(graphs.mixed)} mixed graph sizes)\n"
              f"{split_rule_line(plan, engine.config.kernel_plan)}")
        table, timeline = profile(rc, engine, graphs, rc.calibrate.repeats)
        serving = measure_serving_host(rc, engine)
        device = device_name(rc)
        run = Profiled(table, timeline, serving, graphs,
                       ModelSpec(rc.model_name, engine.model_config),   # what was profiled (model_path's own)
                       device, plan, pinned_plan(engine, device), startup_s, 0.0)
    finally:
        engine.close()
    return run._replace(profile_s=time.perf_counter() - started - startup_s)


def fit(rc, run: Profiled, command: str) -> dict:
    """The calibration: the fit of the profile, with the engine's settings, its kernel plan,
    how the steps were profiled, and the serving loop's host window."""
    tp = rc.engine.tensor_parallel_size
    graphs, model = run.graphs, run.model
    settings = {**dataclasses.asdict(rc.engine), "max_num_seqs": rc.scheduler.max_num_seqs,
                "max_num_batched_tokens": rc.scheduler.max_num_batched_tokens,
                "max_model_len": rc.scheduler.max_model_len, "block_size": rc.cache.block_size,
                "cuda_graph_max_tokens": rc.engine.graph_limit if graphs.mixed or graphs.decode else 0,
                "decode_folds": decode_folds()}
    meta = {"model": rc.model_name, "device": run.device, "tp": tp, "engine_commit": results.commit(),
            "command": command, "engine": settings, "hardware": rc.hardware.name,
            "decode_plan": run.decode_plan.describe() if run.decode_plan else None,
            **moe_meta(model.config)}
    clock = (run.timeline, flops_per_unit(model, tp)) if rc.calibrate.clock else ()
    calib = fit_calibration(run.table, meta, *clock)
    calib["profile_s"] = round(run.profile_s, 1)
    if run.kernel_plan:
        calib["kernel_plan"] = run.kernel_plan   # engine.kernel_plan=<this file> runs the same kernels
    calib["profiled"] = {"timing": "back to back (each step launched while the previous runs)",
                         "sampling": "temperature 1.0 (the engine's default)",
                         "kv_layout": rc.calibrate.kv_layout,
                         "token_ids": profiled_token_ids(rc, model.config.is_moe),
                         "kv_cache_init": rc.calibrate.kv_cache_init}
    # the serving loop's host window: what cost_model.host_window=serving charges
    calib["host_serving"] = fit_serving_host(run.serving)
    return calib


def write(rc, run: Profiled, calib: dict, out: Path) -> dict:
    """The calibration file (checked by loading it back) and the tables it was fitted on, next to
    it; returns the summary's first fields."""
    FittedCostModel(calib, source=str(out))      # loads back
    out.write_text(json.dumps(calib, indent=2) + "\n")
    paths = {"profile": out.with_suffix(".profile.parquet"),
             "serving": out.with_suffix(".serving.parquet"),     # fit_serving_host re-fits it, no GPU
             "timeline": out.with_suffix(".timeline.parquet")}   # the clock term's fit reads it
    run.table.to_parquet(paths["profile"], index=False)
    run.serving.to_parquet(paths["serving"], index=False)
    run.timeline.to_parquet(paths["timeline"], index=False)
    return {"calibration": str(out), **{k: str(v) for k, v in paths.items()},
            "device": run.device,
            "shapes": len(run.table), "startup_s": round(run.startup_s, 1), "profile_s": round(run.profile_s, 1),
            "held_out_mape": {k: round(v["held_out"]["mape"], 4)
                              for k, v in calib["kinds"].items() if "held_out" in v},
            "variants": {k: v.get("variant") for k, v in calib["kinds"].items()}}


def report(rc, run: Profiled, calib: dict, out: Path, command: str, summary: dict) -> None:
    """Print the fit's errors (and fit the roofline's hardware parameters where asked), the clock's
    ratios, the host window, a mixture of experts' held-out error and a recorded run's step
    errors; each also into `summary`."""
    tp, table, graphs = rc.engine.tensor_parallel_size, run.table, run.graphs
    roofline = None
    if rc.calibrate.fit_hardware:
        fitted_hw, roofline = fit_hardware(table, run.model, rc.hardware, tp, graphs,
                                           block_size=rc.cache.block_size, pdl_max_tokens=rc.engine.pdl_max_tokens)
        hw_path = out.with_suffix(".hardware.yaml")
        write_hardware(fitted_hw, hw_path, f"roofline parameters of {rc.hardware.name} fitted on "
                       f"{Path(summary['profile']).name} ({run.device}, {rc.model_name}, tp={tp}); command: {command}")
        summary["hardware"] = str(hw_path)
        summary["roofline_held_out_mape"] = {k: round(v, 4) for k, v in roofline.items()}
    print_fit(calib, roofline)
    clock = clock_ratios(table)
    print_clock_ratios(clock)
    if not clock.empty:
        summary["clock_over_back_to_back"] = {f"{r.timing} {r.group}": round(r.median, 4) for r in clock.itertuples()}
    hs = calib["host_serving"]
    print(f"host window of the engine's step loop ({hs['n']} steps of {SERVING_REQUESTS} requests): "
          + ", ".join(f"{name} {1e6 * hs[name]:.3g} us" for name in SERVING_HOST_TERMS))
    summary["host_serving_us"] = {name: round(1e6 * hs[name], 3) for name in SERVING_HOST_TERMS}
    moe = moe_held_out(calib, table, graphs)
    if moe:
        print_moe_held_out(moe)
        summary["moe_held_out"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in moe.items()}
    if rc.calibrate.check_steps:
        try:
            errors = step_errors(calib, graphs, pd.read_parquet(rc.calibrate.check_steps))
        except ValueError as e:   # a run without a feature the new fit prices: the files stand
            print(f"calibrate.check_steps={rc.calibrate.check_steps}: {e}")
        else:
            print_step_errors(errors, rc.calibrate.check_steps)
            summary["run_steps_median_error"] = {k: round(v["median_error"], 4) for k, v in errors.items()}


def block_cost_sizes(overrides: list[str]) -> tuple[list[int] | None, list[str]]:
    """(the block sizes of `--block-cost B1,B2` / `--block-cost=B1,B2`, or None; the other
    arguments). SystemExit (one line) for a missing or malformed list."""
    rest, sizes, args = [], None, iter(overrides)
    for arg in args:
        if arg == "--block-cost" or arg.startswith("--block-cost="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
            try:
                sizes = [int(x) for x in value.split(",") if x.strip()]
            except ValueError:
                sizes = []
            if not sizes:
                sys.exit(f"experiments.calibrate: --block-cost takes block sizes like 32,64, got {value!r}")
        else:
            rest.append(arg)
    return sizes, rest


def main(argv=None) -> None:
    """`python -m experiments.calibrate <hydra overrides>`: the same as `python run.py
    experiment=calibrate <overrides>`, without Hydra's output directory.
    `python -m experiments.calibrate --host-serving-only <overrides>`: re-measure only the
    calibration's serving-loop host window (remeasure_host_serving).
    `python -m experiments.calibrate --block-cost 32,64 <overrides>`: measure the model's
    attention cost at those KV block sizes against the profiled one and write it into the
    calibration (experiments.block_cost).
    `python -m experiments.calibrate --idle-cost <overrides>`: measure what a step costs after
    the device sat idle and write it into the calibration (experiments.idle_cost)."""
    from hydra import compose, initialize_config_dir
    from experiments.config import register_configs
    overrides = list(sys.argv[1:] if argv is None else argv)
    serving_only = "--host-serving-only" in overrides
    idle_cost = "--idle-cost" in overrides
    block_sizes, overrides = block_cost_sizes([o for o in overrides if o not in ("--host-serving-only",
                                                                                 "--idle-cost")])
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=["experiment=calibrate"] + overrides)
    if serving_only or block_sizes or idle_cost:
        try:
            if serving_only:
                remeasure_host_serving(cfg, overrides)
            if block_sizes:
                from experiments.block_cost import measure_block_cost
                measure_block_cost(build(cfg), block_sizes, "python -m experiments.calibrate "
                                   f"--block-cost {','.join(map(str, block_sizes))} " + " ".join(overrides))
            if idle_cost:
                from experiments.idle_cost import measure_idle_cost
                measure_idle_cost(build(cfg), "python -m experiments.calibrate --idle-cost " + " ".join(overrides))
        except ValueError as e:
            sys.exit(f"experiments.calibrate: {e}")
    else:
        calibrate(cfg, overrides=["experiment=calibrate"] + overrides)


def calibration_path(rc: RunConfig) -> Path:
    """calibrate.out, else simulator/calibrations/<model>-<hardware>-tp<tp>.json."""
    return Path(rc.calibrate.out or REPO / "simulator" / "calibrations" /
                f"{rc.model_name}-{rc.hardware.name}-tp{rc.engine.tensor_parallel_size}.json")


def existing_calibration(rc: RunConfig, flag: str) -> tuple[Path, dict]:
    """(path, contents) of the calibration a re-measuring mode (`flag`) adds to: the file
    calibration_path names, made for rc's model and tensor parallelism, on the engine
    (mode=gpu). ValueError (one line, naming `flag`) otherwise."""
    if rc.mode != "gpu":
        raise ValueError("calibration measures the engine: use mode=gpu (experiment=calibrate sets it)")
    out, tp = calibration_path(rc), rc.engine.tensor_parallel_size
    if not out.is_file():
        raise ValueError(f"{flag}: no calibration at {out} (make one with "
                         "`python run.py experiment=calibrate ...`)")
    calib = json.loads(out.read_text())
    if calib.get("model") != rc.model_name or int(calib.get("tp", 1)) != tp:
        raise ValueError(f"{flag}: {out} is for {calib.get('model')} tp={calib.get('tp')}, "
                         f"not {rc.model_name} tp={tp}")
    return out, calib


if __name__ == "__main__":
    main()
