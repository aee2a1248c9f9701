"""Event skipping for the simulator's step loop: while the next turns of policy.StepLoop
keep every running sequence decoding (policy.fast_forward), run them as one stretch: each
turn costed by the executor's own launch (so device and host times and their overlap are
the loop's), requests arriving meanwhile queued and admitted by the stretch's steps as the
scheduler would, sequences finishing inside it, and each running sequence's tokens and
counters written once at the end. The result is the turn-by-turn loop's, to the last bit of
every timestamp and record (tests/test_fast_forward.py runs both).

Used only where nothing outside the replica can observe the turns in between: one replica
(a router would see another replica's state mid-stretch) and a stateless cost model (a
replayed run is consumed turn by turn).
"""
import math
from collections.abc import Callable

from policy.fast_forward import plan_decode_stretch
from policy.step_loop import InFlight


def skip_decode_turns(replica, state, now: float, admit: Callable[[float], None]) -> tuple[int, list]:
    """If the replica's next turns (the first at `now`) can run as a decode stretch, run
    them: records appended, requests arriving meanwhile queued by `admit(t)` (at the turn
    starting at t, as the step loop would) and admitted by the stretch, the executor's
    clock at the end of the last turn, the last step in flight (asynchronous scheduling).
    Returns (turns taken, sequences completed); (0, []) when the next turn must go through
    `StepLoop.step` (nothing changed then)."""
    loop, executor, sched = replica.loop, replica.executor, replica.scheduler
    stretch = plan_decode_stretch(sched, state.salt)
    if stretch is None:
        return 0, []
    requests = state.requests
    next_arrival = requests[state.next].arrival_s if state.next < len(requests) else math.inf

    # Each turn: StepLoop.step's order of schedule, launch, receive and update, on the executor.
    previous = loop.in_flight
    async_scheduling = loop.async_scheduling
    after_wait = executor.cost.host.after_wait
    schedule, update, launch = stretch.schedule, stretch.update, executor.launch
    records, ends = [], []
    ready = previous.handle[0] if previous is not None else None
    received = len(previous.batch.seqs) if previous is not None else 0
    done = []
    t = now
    while not stretch.ended:
        if next_arrival <= t:       # the turn's requests arrive before it is formed
            admit(t)
            next_arrival = requests[state.next].arrival_s if state.next < len(requests) else math.inf
        record = schedule(t)
        if record is None:
            break
        executor.t = t
        handle = launch(None, None, record)
        record["launch_s"] = launched = executor.t
        record["tokens_s"] = math.nan
        t = max(launched, ready) + after_wait(received) if ready is not None else launched
        if previous is not None:    # the first turn receives the step in flight before
            previous.record["tokens_s"] = t
            done += sched.receive(previous.batch, tokens_of(previous.handle, state.salt), t)
            loop.in_flight = previous = None
        update(t)
        num_seqs = record["num_seqs"]
        if async_scheduling:
            ready, received = handle[0], num_seqs
        else:                       # receive this one at once
            t = max(t, handle[0]) + after_wait(num_seqs)
            record["tokens_s"] = t
        record["end_s"] = t
        record["duration_s"] = t - record["start_s"]
        records.append(record)
        ends.append(t)
    k = len(records)
    if not k:
        stretch.close([])       # no step taken: nothing to write back, nothing lagging
        return 0, []
    executor.t = t

    # The sequences' tokens and counters: step j's tokens come with turn j + 1 (async;
    # the last is in flight) or with turn j.
    if async_scheduling:
        for j in range(k - 1):
            records[j]["tokens_s"] = ends[j + 1]
        done += stretch.close(ends[1:] + ends[-1:], in_flight=True)
        last, tokens = stretch.last_step()
        loop.in_flight = InFlight(last, (ready, last, tokens), records[-1])
    else:
        done += stretch.close(ends)
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
