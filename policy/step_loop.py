"""The step loop both executors run: one rule for when steps are formed, launched and
their tokens received, with or without asynchronous scheduling.

One `step(now)`:

    batch = scheduler.schedule(now)          # step N+1 is formed ...
    handle = launch(batch, previous)         # ... and handed to the device
    receive(step N)                          # wait for step N's tokens (async: N ran meanwhile)
    scheduler.update(batch, None, clock())   # placeholders for step N+1's tokens
    [without async scheduling: receive(step N+1) at once]

So with asynchronous scheduling step N+1 is formed when step N has just been launched: a
request that arrives while step N runs is first scheduled in step N+2, and a stop token
sampled in step N is seen only after step N+1 was formed (`Scheduler.receive`).

The executor supplies three callables; the loop never touches time or tokens otherwise:

    launch(batch, previous, record) -> handle   start the step (previous: the in-flight
                                                step's handle, or None); may add fields to
                                                the step's record
    wait(handle, record) -> token ids           block until the step's tokens exist (one per
                                                batch entry, -1 where none); may add fields
    clock() -> seconds                          the executor's time (wall or simulated)

Each step with work leaves a record (`Batch.record` plus): start_s (when it was formed),
launch_s (when launch returned), tokens_s (when its tokens were received: the time of
its sampled tokens), end_s (when the `step` that formed it returned), duration_s = end_s -
start_s. A step whose forming only preempted (nothing to run) is recorded too, with
tokens_s NaN: it changed the policy's state.
"""
import math
from dataclasses import dataclass
from typing import Callable

from policy.batch import Batch
from policy.scheduler import Scheduler
from policy.sequence import Sequence


@dataclass(slots=True)
class InFlight:
    """A launched step whose tokens have not been received."""
    batch: Batch
    handle: object
    record: dict


class StepLoop:
    """Drives one `Scheduler` through an executor's launch / wait / clock.
    `records` receives one dict per recorded step (see the module docstring)."""

    def __init__(self, scheduler: Scheduler, launch: Callable, wait: Callable,
                 clock: Callable[[], float], async_scheduling: bool, records: list | None = None):
        self.scheduler = scheduler
        self.launch, self.wait, self.clock = launch, wait, clock
        self.async_scheduling = async_scheduling
        self.records = [] if records is None else records
        self.in_flight: InFlight | None = None
        self.last_record: dict | None = None    # the record the last `step` made, if any

    def has_work(self) -> bool:
        """Something to schedule or a step still to receive."""
        return self.scheduler.has_unfinished() or self.in_flight is not None

    def step(self, now: float) -> list[Sequence]:
        """Form, launch and record one step at time `now`; receive the previous one.
        Returns the sequences completed by the steps received (their last token known)."""
        batch = self.scheduler.schedule(now)
        self.last_record = None
        record = None
        if batch.seqs or batch.num_preempted:
            record = batch.record(now, 0.0)
            self.records.append(record)
            self.last_record = record
        handle = None
        if batch.seqs:
            previous = self.in_flight.handle if self.in_flight is not None else None
            handle = self.launch(batch, previous, record)
        if record is not None:
            record["launch_s"] = self.clock()
            record["tokens_s"] = math.nan
        done = self._receive() if self.in_flight is not None else []
        if handle is not None:
            self.scheduler.update(batch, None, self.clock())
            self.in_flight = InFlight(batch, handle, record)
            if not self.async_scheduling:
                done += self._receive()
        if record is not None:
            record["end_s"] = end = self.clock()
            record["duration_s"] = end - now
        return done

    def drain(self) -> list[Sequence]:
        """Receive the in-flight step, if any (stopping, or before idling)."""
        return self._receive() if self.in_flight is not None else []

    def _receive(self) -> list[Sequence]:
        step, self.in_flight = self.in_flight, None
        tokens = self.wait(step.handle, step.record)
        now = self.clock()
        step.record["tokens_s"] = now
        return self.scheduler.receive(step.batch, tokens, now)
