"""Event skipping for the simulator's step loop: when the next turns of policy.StepLoop
would be plain decode steps (policy.fast_forward), cost them one after another (the
executor's own launch, so device and host times and their overlap are the loop's), keep
those that start before the next arrival, and apply them to the policy at once. The result
is the turn-by-turn loop's, to the last bit of every timestamp and record
(tests/test_fast_forward.py runs both).

Used only where nothing outside the replica can observe the turns in between: one replica
(a router would see another replica's state mid-stretch) and a stateless cost model (a
replayed run is consumed turn by turn).
"""
import math

from policy.fast_forward import plan_decode_stretch
from policy.step_loop import InFlight


def skip_decode_turns(replica, state, now: float) -> tuple[int, list]:
    """If the replica's next turns (the first at `now`) are a decode stretch, run as many as
    start before the next arrival: records appended, the executor's clock at the end of the
    last turn, the last step in flight (asynchronous scheduling). Returns (turns taken,
    sequences completed); (0, []) when the next turn must go through `StepLoop.step`."""
    pending = state.next        # the next request to admit (every one up to `now` is in)
    next_arrival = state.requests[pending].arrival_s if pending < len(state.requests) else math.inf
    if state.steps and next_arrival - now < 2 * state.steps[-1]["duration_s"]:
        return 0, []     # room for a turn or two at most: planning would cost what it saves
    loop, executor, sched = replica.loop, replica.executor, replica.scheduler
    stretch = plan_decode_stretch(sched, state.salt)
    if stretch is None:
        return 0, []

    # The turns' times: StepLoop.step's order of launch and receive, on the executor.
    previous = loop.in_flight
    async_scheduling = loop.async_scheduling
    after_wait = executor.cost.host.after_wait
    num_seqs = len(stretch.seqs)
    records, ends, launches = [], [], []
    ready = previous.handle[0] if previous is not None else None
    received = len(previous.batch.seqs) if previous is not None else 0
    t = now
    for j in range(stretch.max_steps):
        if j and next_arrival <= t:          # this turn would admit a request first
            break
        start = t
        record = stretch.record(j, start, 0.0)
        executor.t = start
        handle = executor.launch(None, None, record)
        record["launch_s"] = launched = executor.t
        record["tokens_s"] = math.nan
        if ready is not None:                # receive the step in flight
            t = max(launched, ready) + after_wait(received)
        else:
            t = launched
        if not async_scheduling:             # receive this one at once
            t = max(t, handle[0]) + after_wait(num_seqs)
            record["tokens_s"] = t
            ready = None
        else:
            ready, received = handle[0], num_seqs
        record["end_s"] = t
        record["duration_s"] = t - start
        records.append(record)
        ends.append(t)
        launches.append(launched)
    k = len(records)
    executor.t = t

    # The policy: the step in flight before the stretch is received in its first turn,
    # then the stretch's steps land.
    done = []
    if previous is not None:
        received_at = ends[0]
        previous.record["tokens_s"] = received_at
        done += sched.receive(previous.batch, tokens_of(previous.handle, state.salt), received_at)
        loop.in_flight = None
    if async_scheduling:     # step j's tokens come with turn j + 1; the last is in flight
        for j in range(k - 1):
            records[j]["tokens_s"] = ends[j + 1]
        finished = stretch.apply(k, ends[1:] + ends[-1:], in_flight=True)
        last = stretch.batch(k - 1)
        loop.in_flight = InFlight(last, (ready, last, stretch.tokens), records[-1])
    else:
        finished = stretch.apply(k, ends)
        done += finished
    r, step, num_blocks = replica.index, replica.num_steps, sched.block_manager.num_blocks
    for j, record in enumerate(records):
        record.update(replica=r, step=step + j, kv_usage=record["kv_blocks_used"] / num_blocks)
    loop.records += records
    loop.last_record = records[-1]
    state.steps += records
    replica.num_steps += k
    return k, done


def tokens_of(handle, salt: dict) -> list[int]:
    """The tokens of a launched step (-1 where it sampled none). `handle`: the executor's,
    (ready, batch), or a stretch's last step, (ready, batch, tokens)."""
    if len(handle) > 2:
        return handle[2]
    return [salt[s.seq_id] if sample else -1 for s, sample in zip(handle[1].seqs, handle[1].sample)]
