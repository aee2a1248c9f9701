"""The discrete-event simulator: the engine's step loop (policy.step_loop, the same code),
with a cost model for the GPU.

One simpy process walks the requests in arrival order and routes each to a replica; one
process per replica turns the step loop. Each turn forms a step at the current simulated
time, "launches" it (host time before the launch, the admission of the requests that arrived
since the last launch included, then device time on a device that runs one step at a time),
receives the previous step's tokens (waiting for the device), and updates the policy; the
next turn starts when the host is done. With asynchronous scheduling step N+1 is thus formed
while step N runs, as on the engine; host time shows only where the device does not hide it.

With a `ReplayCostModel` every step is formed, launched and received at the times the
recorded run did, and checked against the record: the policy-equivalence check.

An idle replica sleeps on an event the arrival process triggers; it never polls.
"""
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import simpy

from policy import CacheConfig, Scheduler, SchedulerConfig, Sequence
from policy.step_loop import StepLoop
from simulator.clock import Clock
from simulator.cluster import ROUTERS, Replica
from simulator.cost_model import CostModel, ReplayCostModel
from simulator.fast_forward import skip_decode_turns, tokens_of

# Generated token ids need no model. Each request repeats its own id in this range, set by
# its position in the trace and the seed: deterministic (output blocks hash the same in
# every run), distinct across requests (no false prefix hits on outputs), one dict lookup.
TOKEN_ID_RANGE = 1 << 15


@dataclass
class SimResult:
    """sequences: every request's `Sequence`, in request order (seq_id = request_id).
    replica_of: request_id -> replica index. steps: one dict per step, policy.StepLoop's
    record (start_s, launch_s, tokens_s, end_s, duration_s and the batch's features) plus
    `device_s`, `replica`, `step` and `kv_usage` (kv_blocks_used / num_blocks).
    duration_s: simulated time of the last finish. wall_s: wall-clock seconds of `run`.
    cache_stats: each replica's `BlockManager.stats`; num_blocks: KV blocks per replica.
    replayed_steps: steps checked against a replayed record (0 without replay).
    num_iterations: turns of the replicas' step loops, a skipped stretch counting one
    (len(steps) / num_iterations is the event-skipping factor)."""
    sequences: list[Sequence]
    replica_of: dict
    steps: list[dict]
    duration_s: float
    wall_s: float
    num_blocks: int
    cache_stats: list[dict] = field(default_factory=list)
    replayed_steps: int = 0
    num_iterations: int = 0


class SimExecutor:
    """A replica's device and host clock, behind the step loop's launch / wait / clock.
    `t` is the host's simulated time; the device runs launched steps one after another.
    Requests routed to the replica are counted (`admit`) until the next launch, which pays
    their admission (HostCosts.admission) in its window: the engine adds a turn's arrivals
    after polling the clock the step is formed at, before it forms the step. A turn that
    launches nothing carries them to the next launch."""

    def __init__(self, cost: CostModel, salt: dict):
        self.cost, self.salt = cost, salt
        self.replay = cost if isinstance(cost, ReplayCostModel) else None
        self.t = 0.0
        self.device_free = 0.0      # when the device finishes the last launched step
        self.launched = False       # whether a step was launched (the device idled before)
        self.current = None         # the replayed record of the step being formed
        self.admitted = 0           # requests added since the last launch ...
        self.admitted_tokens = 0    # ... and their prompt tokens
        self.gpu_clock = Clock(cost.clock) if cost.clock is not None and self.replay is None else None

    def clock(self) -> float:
        return self.t

    def admit(self, prompt_len: int) -> None:
        self.admitted += 1
        self.admitted_tokens += prompt_len

    def launch(self, batch, previous, record) -> tuple[float, list]:
        """Returns the handle (time the step's tokens exist, batch)."""
        admitted, admitted_tokens = self.admitted, self.admitted_tokens
        self.admitted = self.admitted_tokens = 0
        if self.replay is not None:
            rec = self.current
            self.t = rec["launch_s"]
            record["device_s"] = rec.get("device_s", math.nan)
            return rec["tokens_s"], batch
        features, host = record, self.cost.host
        self.t += (host.admission(admitted, admitted_tokens)
                   + host.before_launch(features["num_seqs"], features["num_prefill_tokens"]))
        start = max(self.t, self.device_free)
        price = self.cost.predict(features)
        extra = 0.0
        if self.cost.idle is not None:      # after the device sat idle (the first step: since
            gap = start - self.device_free if self.launched else math.inf   # start-up)
            extra = self.cost.idle.extra(gap, features["num_prefill_tokens"], price)
        self.launched = True
        if self.gpu_clock is not None:      # the base-clock price under the clock's state
            device = self.gpu_clock.run(start, price, features, extra)
        else:
            device = price + extra
        record["device_s"], record["gpu_gap_s"] = device, start - self.device_free
        self.device_free = start + device
        return self.device_free, batch

    def wait(self, handle, record) -> list[int]:
        ready, batch = handle[0], handle[1]
        if self.replay is not None:
            self.t = ready
        else:
            self.t = max(self.t, ready) + self.cost.host.after_wait(len(batch.seqs))
        return tokens_of(handle, self.salt)


class Simulator:
    """Replays requests on `num_replicas` simulated engines, each a `Scheduler` with
    `num_blocks` KV blocks driven by policy.StepLoop, whose steps cost what `cost_model`
    says. Requests (anything with request_id, arrival_s, prompt_token_ids, output_len,
    sorted by arrival_s) run with `ignore_eos` and `max_tokens = output_len`.
    `async_scheduling`: as the engine's (form step N+1 while step N runs). `event_skipping`:
    simulate runs of plain decode steps at once (simulator.fast_forward: the same result as
    turn by turn; used with one replica and a stateless cost model). The same inputs give
    the same result."""

    def __init__(self, sched_cfg: SchedulerConfig, cache_cfg: CacheConfig, cost_model: CostModel,
                 num_blocks: int, num_replicas: int = 1, router: str = "round_robin", seed: int = 0,
                 async_scheduling: bool = True, event_skipping: bool = True):
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
        self.async_scheduling = async_scheduling
        self.event_skipping = (event_skipping and num_replicas == 1
                               and not isinstance(cost_model, ReplayCostModel))
        self.route = ROUTERS[router]

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
        state = _RunState(requests)
        replicas = state.replicas
        for r in range(self.num_replicas):
            # the cost model's decode plan, if it prices one: every step then records its span
            scheduler = Scheduler(self.sched_cfg, self.cache_cfg, self.num_blocks,
                                  decode_plan=self.cost_model.decode_plan)
            replica = Replica(r, scheduler)
            replica.executor = SimExecutor(self.cost_model, state.salt)
            replica.loop = StepLoop(scheduler, replica.executor.launch, replica.executor.wait,
                                    replica.executor.clock, self.async_scheduling)
            replicas.append(replica)
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
        replay = replicas[0].executor.replay
        if replay is not None:
            replay.check_done()
        return SimResult(sequences=sequences, replica_of=state.replica_of, steps=state.steps,
                         duration_s=max((s.finish_time for s in sequences), default=0.0),
                         wall_s=time.perf_counter() - wall0, num_blocks=self.num_blocks,
                         cache_stats=[r.scheduler.block_manager.stats for r in replicas],
                         replayed_steps=replay.next_step if replay is not None else 0,
                         num_iterations=state.num_iterations)

    def _admit(self, replicas, state, t: float) -> None:
        """Route and queue every request that has arrived by `t` (in arrival order)."""
        requests = state.requests
        while state.next < len(requests) and requests[state.next].arrival_s <= t:
            self._admit_next(replicas, state)

    def _admit_next(self, replicas, state) -> None:
        i = state.next
        req = state.requests[i]
        seq = Sequence(req.request_id, req.prompt_token_ids, req.output_len,
                       arrival_time=req.arrival_s, ignore_eos=True)
        r = self.route(seq, replicas, i)
        try:
            replicas[r].scheduler.add(seq)
        except ValueError as e:
            raise ValueError(f"request {i} ({req.request_id!r}) of the trace: {e}") from e
        state.next = i + 1
        state.last_arrival = req.arrival_s
        state.sequences.append(seq)
        state.replica_of[req.request_id] = r
        replicas[r].executor.admit(len(req.prompt_token_ids))
        state.salt[req.request_id] = (self.seed * 1_000_003 + i * 7919) % TOKEN_ID_RANGE
        replicas[r].wake()

    def _arrivals(self, env, replicas, state):
        requests = state.requests
        while state.next < len(requests):
            req = requests[state.next]
            if req.arrival_s > env.now:
                yield env.timeout(req.arrival_s - env.now)
            if state.next < len(requests) and requests[state.next] is req:   # not yet admitted by a step
                self._admit_next(replicas, state)
        state.arrivals_done = True
        for replica in replicas:     # let idle replicas see that no more work will come
            replica.wake()

    def _step_loop(self, env, replica: Replica, state, progress):
        """Turns of the step loop. `now` carries the exact time of each turn (simpy's clock
        is only used to order the replicas and arrivals)."""
        loop, executor, sched, steps = replica.loop, replica.executor, replica.scheduler, state.steps
        replay, num_blocks, r = executor.replay, self.num_blocks, replica.index
        now = env.now
        while True:
            self._admit(state.replicas, state, now)
            if not loop.has_work():
                if state.arrivals_done and state.next >= len(state.requests):
                    return
                replica.idle = env.event()
                yield replica.idle
                # Woken by an arrival: the turn starts at its time exactly (simpy's clock is a
                # sum of delays, which rounds differently depending on who slept when).
                now = max(now, state.last_arrival)
                continue
            state.num_iterations += 1
            if self.event_skipping:
                skipped, done = skip_decode_turns(
                    replica, state, now, lambda t: self._admit(state.replicas, state, t))
                if skipped:
                    if done and progress is not None:
                        progress(len(done))
                    if executor.t > now:
                        now = executor.t
                        yield env.timeout(max(0.0, now - env.now))
                    continue
            if replay is not None and sched.has_unfinished():
                i = replay.next_step
                executor.current = replay.take(now)
                if executor.current["start_s"] > now:
                    now = executor.current["start_s"]
                    yield env.timeout(max(0.0, now - env.now))
                    self._admit(state.replicas, state, now)
            else:
                i = None
            executor.t = now
            done = loop.step(now)
            record = loop.last_record
            if i is not None:
                replay.check(i, record)
                executor.t = record["end_s"] = executor.current["end_s"]   # the host's work after
                record["duration_s"] = record["end_s"] - now                # the tokens, as recorded
            if record is not None:
                record.update(replica=r, step=replica.num_steps,
                              kv_usage=record["kv_blocks_used"] / num_blocks)
                record.setdefault("device_s", math.nan)
                steps.append(record)
                replica.num_steps += 1
            if done and progress is not None:
                progress(len(done))
            if executor.t > now:
                now = executor.t
                yield env.timeout(max(0.0, now - env.now))


class _RunState:
    """What one `run` accumulates (kept off the Simulator so runs never share state)."""

    def __init__(self, requests):
        self.requests = requests
        self.sequences: list[Sequence] = []
        self.replica_of: dict = {}
        self.salt: dict = {}             # request_id -> the token id it generates
        self.steps: list[dict] = []
        self.replicas: list[Replica] = []
        self.next = 0                    # index of the next request to admit
        self.last_arrival = 0.0
        self.arrivals_done = False
        self.num_iterations = 0
