"""The discrete-event simulator: the policy layer's step loop, with a cost model for a GPU.

One simpy process walks the requests in arrival order and routes each to a replica; one
process per replica runs the step contract of DESIGN.md:

    batch = scheduler.schedule(now)
    dt    = cost_model(batch)                 # simulated seconds instead of a forward pass
    yield timeout(dt)
    scheduler.update(batch, token_ids, now)

An idle replica sleeps on an event the arrival process triggers; it never polls. Simulated
time only advances by arrivals and step durations, so the run's speed is the policy's speed
plus a few microseconds per step.
"""
import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import simpy

from policy import CacheConfig, Scheduler, SchedulerConfig, Sequence
from simulator.cluster import ROUTERS, Replica
from simulator.cost_model import CostModel, ReplayCostModel
from simulator.fast_forward import skip_decode_steps

# Generated token ids need no model. Each request repeats its own id in this range, set by
# its position in the trace and the seed: deterministic (output blocks hash the same in
# every run), distinct across requests (no false prefix hits on outputs), one dict lookup.
TOKEN_ID_RANGE = 1 << 15


@dataclass
class SimResult:
    """sequences: every request's `Sequence`, in request order (seq_id = request_id).
    replica_of: request_id -> replica index. steps: one dict per step, the
    `Batch.record(start, duration)` columns plus `prefill_kv_tokens`,
    `prefill_attention_pairs`, `replica`, `step` and `kv_usage` (kv_blocks_used / num_blocks).
    duration_s: simulated time of the last finish. wall_s: wall-clock seconds of `run`.
    cache_stats: each replica's `BlockManager.stats`; num_blocks: KV blocks per replica.
    num_iterations: passes through the replicas' step loops (steps / num_iterations is the
    event-skipping factor)."""
    sequences: list[Sequence]
    replica_of: dict
    steps: list[dict]
    duration_s: float
    wall_s: float
    num_blocks: int
    cache_stats: list[dict] = field(default_factory=list)
    num_iterations: int = 0


class Simulator:
    """Replays requests on `num_replicas` simulated engines, each a `Scheduler` with
    `num_blocks` KV blocks whose steps take `cost_model` seconds. Requests (anything with
    request_id, arrival_s, prompt_token_ids, output_len, sorted by arrival_s) run with
    `ignore_eos` and `max_tokens = output_len`. The same inputs give the same result.
    `event_skipping`: simulate runs of plain decode steps at once (simulator.fast_forward;
    the same result as step by step; used with one replica and a stateless cost model)."""

    def __init__(self, sched_cfg: SchedulerConfig, cache_cfg: CacheConfig, cost_model: CostModel,
                 num_blocks: int, num_replicas: int = 1, router: str = "round_robin", seed: int = 0,
                 event_skipping: bool = True):
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {tuple(ROUTERS)}, got {router!r}")
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if num_replicas > 1 and isinstance(cost_model, ReplayCostModel):
            raise ValueError("a replay cost model holds one replica's steps: use num_replicas=1")
        self.sched_cfg, self.cache_cfg, self.cost_model = sched_cfg, cache_cfg, cost_model
        self.num_blocks, self.num_replicas, self.seed = num_blocks, num_replicas, seed
        self.route = ROUTERS[router]
        self.event_skipping = (event_skipping and num_replicas == 1
                               and not isinstance(cost_model, ReplayCostModel))

    def run(self, requests, progress: Callable[[int], None] | None = None) -> SimResult:
        """Simulate until every request finished. `progress(n)` is called with the number of
        requests finished by each step that finished some."""
        wall0 = time.perf_counter()
        seen = set()
        for i, req in enumerate(requests):
            if i and req.arrival_s < requests[i - 1].arrival_s:
                raise ValueError(f"requests must be sorted by arrival_s: request {i} "
                                 f"({req.request_id!r}) arrives at {req.arrival_s}, before "
                                 f"request {i - 1} ({requests[i - 1].arrival_s})")
            if req.request_id in seen:
                raise ValueError(f"request {i}: request_id {req.request_id!r} is used twice")
            seen.add(req.request_id)
        self.cost_model.reset()
        env = simpy.Environment()
        replicas = [Replica(r, Scheduler(self.sched_cfg, self.cache_cfg, self.num_blocks))
                    for r in range(self.num_replicas)]
        state = _RunState(requests)
        env.process(self._arrivals(env, replicas, state))
        for replica in replicas:
            env.process(self._step_loop(env, replica, state, progress))
        # The run allocates millions of small objects and frees few: the cyclic collector
        # would rescan them all, again and again, for cycles that are not there.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            env.run()
        finally:
            if gc_was_enabled:
                gc.enable()
        sequences = state.sequences
        unfinished = [s.seq_id for s in sequences if not s.is_finished]
        if unfinished or len(sequences) != len(requests):   # a bug, not bad input
            raise RuntimeError(f"simulation ended with unfinished requests: {unfinished[:5]}")
        return SimResult(sequences=sequences, replica_of=state.replica_of, steps=state.steps,
                         duration_s=max((s.finish_time for s in sequences), default=0.0),
                         wall_s=time.perf_counter() - wall0, num_blocks=self.num_blocks,
                         cache_stats=[r.scheduler.block_manager.stats for r in replicas],
                         num_iterations=state.num_iterations)

    def _arrivals(self, env, replicas, state):
        for i, req in enumerate(state.requests):
            if req.arrival_s > env.now:
                yield env.timeout(req.arrival_s - env.now)
            seq = Sequence(req.request_id, req.prompt_token_ids, req.output_len,
                           arrival_time=req.arrival_s, ignore_eos=True)
            r = self.route(seq, replicas, i)
            try:
                replicas[r].scheduler.add(seq)
            except ValueError as e:
                raise ValueError(f"request {i} ({req.request_id!r}) of the trace: {e}") from e
            state.sequences.append(seq)
            state.replica_of[req.request_id] = r
            state.salt[req.request_id] = (self.seed * 1_000_003 + i * 7919) % TOKEN_ID_RANGE
            replicas[r].wake()
        state.arrivals_done = True
        for replica in replicas:     # let idle replicas see that no more work will come
            replica.wake()

    def _step_loop(self, env, replica: Replica, state, progress):
        sched, cost, salt, steps = replica.scheduler, self.cost_model, state.salt, state.steps
        num_blocks, r = self.num_blocks, replica.index
        while True:
            if self.event_skipping:
                skipped, finished = yield from skip_decode_steps(env, replica, state, cost, num_blocks)
                if skipped:
                    state.num_iterations += 1
                    if finished and progress is not None:
                        progress(len(finished))
                    continue
            batch = sched.schedule(env.now)
            if not batch.seqs:
                if state.arrivals_done:
                    if sched.has_unfinished():
                        raise RuntimeError(
                            f"replica {r}: the scheduler returned an empty batch at t={env.now:.6f}s "
                            f"with {sched.num_waiting} waiting and {sched.num_running} running "
                            "requests and no arrivals left: the policy is stuck")
                    return
                replica.idle = env.event()
                yield replica.idle
                continue
            features = batch.features()
            dt = cost.predict(features)
            start = env.now
            yield env.timeout(dt)
            token_ids = [salt[s.seq_id] for s in batch.seqs]
            finished = sched.update(batch, token_ids, env.now)
            features.update(start_s=start, duration_s=dt, replica=r, step=replica.num_steps,
                            kv_usage=batch.kv_blocks_used / num_blocks)
            steps.append(features)
            replica.num_steps += 1
            state.num_iterations += 1
            if finished and progress is not None:
                progress(len(finished))


class _RunState:
    """What one `run` accumulates (kept off the Simulator so runs never share state)."""

    def __init__(self, requests):
        self.requests = requests
        self.sequences: list[Sequence] = []
        self.replica_of: dict = {}
        self.salt: dict = {}             # request_id -> the token id it generates
        self.steps: list[dict] = []
        self.arrivals_done = False
        self.num_iterations = 0
