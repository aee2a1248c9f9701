"""Scheduler: stateful invariants under random load, plus the vLLM behaviours DESIGN.md pins."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from policy import CacheConfig, Scheduler, SchedulerConfig, Sequence, SequenceStatus

WAITING, RUNNING, FINISHED = SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.FINISHED
EOS = 0
PREFIXES = [tuple(range(1, 1 + n)) for n in (0, 5, 9)] + [(3,) * 7]


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals with shared prefixes, random outputs (eos allowed), small pools."""

    @initialize(policy=st.sampled_from(["chunked", "prefill_first"]),
                block_size=st.sampled_from([1, 2, 4, 8]), num_blocks=st.integers(8, 40),
                max_num_seqs=st.integers(1, 6), budget_extra=st.integers(0, 24),
                threshold=st.sampled_from([0, 0, 5]), caching=st.booleans())
    def setup(self, policy, block_size, num_blocks, max_num_seqs, budget_extra, threshold, caching):
        budget = max(max_num_seqs, block_size) + budget_extra
        self.cfg = SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=budget, max_model_len=64,
                                   long_prefill_token_threshold=threshold)
        self.sched = Scheduler(self.cfg, CacheConfig(block_size=block_size, enable_prefix_caching=caching),
                               num_blocks)
        self.block_size = block_size
        self.capacity = num_blocks * block_size
        self.now = 0.0
        self.added: list[Sequence] = []
        self.computed_prefixes: set[tuple] = set()   # every block-aligned prefix whose KV was computed
        self.steps = 0

    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(1, 3), max_size=12),
          max_tokens=st.integers(1, 10), ignore_eos=st.booleans())
    def arrive(self, prefix, suffix, max_tokens, ignore_eos):
        prompt = list(prefix) + suffix or [1]
        seq = Sequence(len(self.added), prompt, max_tokens, arrival_time=self.now,
                       ignore_eos=ignore_eos, eos_token_id=EOS)
        longest = len(prompt) + max_tokens
        if longest > self.cfg.max_model_len or longest - 1 > self.capacity:
            with pytest.raises(ValueError, match=repr(seq.seq_id)):
                self.sched.add(seq)
            return
        self.sched.add(seq)
        self.added.append(seq)

    @rule(tokens=st.lists(st.integers(0, 3), min_size=64, max_size=64))
    def step(self, tokens):
        sched, cfg = self.sched, self.cfg
        had_work = sched.has_unfinished()
        was_running = set(map(id, sched.running))
        batch = sched.schedule(self.now)
        if had_work:   # no deadlock: with work queued, every step does something
            assert len(batch) > 0
        assert len(batch) <= cfg.max_num_seqs
        assert len({id(s) for s in batch.seqs}) == len(batch)
        assert sum(batch.num_new_tokens) == batch.num_batched_tokens <= cfg.max_num_batched_tokens
        assert batch.num_prefill_tokens + batch.num_decode_seqs == batch.num_batched_tokens
        if cfg.policy == "prefill_first":   # a prefill step or a decode step, never mixed
            decoding = [id(s) in was_running for s in batch.seqs]
            assert all(decoding) or not any(decoding)
            if all(decoding):
                assert batch.num_new_tokens == [1] * len(batch)
        for seq, start, n in zip(batch.seqs, batch.num_computed_tokens, batch.num_new_tokens):
            assert n >= 1 and start == seq.num_computed_tokens
            assert start + n <= seq.num_tokens
            assert len(seq.block_table) * self.block_size >= start + n   # slots exist
            if cfg.long_prefill_token_threshold and cfg.policy == "chunked":
                assert n <= cfg.long_prefill_token_threshold
            # prefix hits only for identical content computed before
            if seq.num_cached_tokens and start == seq.num_cached_tokens:
                assert tuple(seq.token_ids[:start]) in self.computed_prefixes
        self.now += 1.0
        finished = sched.update(batch, tokens[:len(batch)], self.now)
        for seq in batch.seqs:
            for m in range(1, seq.num_computed_tokens // self.block_size + 1):
                self.computed_prefixes.add(tuple(seq.token_ids[:m * self.block_size]))
        for seq in finished:
            assert seq.status is FINISHED and seq.block_table == []
            assert seq.num_output_tokens == seq.max_tokens or seq.token_ids[-1] == EOS
        self.steps += 1

    @rule(data=st.data())
    def abort(self, data):
        live = [s for s in self.added if s.status is not FINISHED]
        if live:
            seq = data.draw(st.sampled_from(live))
            assert self.sched.abort(seq.seq_id)
            assert seq.finish_reason == "abort" and seq.block_table == []

    @rule(data=st.data())
    def stop_seen_late(self, data):
        """An executor that learns of a stop token after the next schedule (the engine's
        async scheduling) finishes the sequence with Scheduler.finish, running or preempted."""
        live = [s for s in self.added if s.status is not FINISHED and s.num_output_tokens]
        if live:
            seq = data.draw(st.sampled_from(live))
            self.sched.finish(seq, "stop", self.now)
            assert seq.status is FINISHED and seq.block_table == [] and seq.finish_time == self.now
            assert seq.seq_id not in self.sched.sequences
            self.sched.finish(seq, "stop", self.now + 1)    # a no-op once finished
            assert seq.finish_time == self.now

    @invariant()
    def states_partition_the_requests(self):
        if not hasattr(self, "sched"):
            return
        sched = self.sched
        waiting, running = set(map(id, sched.waiting)), set(map(id, sched.running))
        assert not waiting & running
        assert len(sched.running) <= self.cfg.max_num_seqs
        for seq in self.added:
            in_queues = (id(seq) in waiting) + (id(seq) in running)
            assert in_queues == (seq.status is not FINISHED)
            assert (seq.status is RUNNING) == (id(seq) in running)
        sched.block_manager.check_integrity()
        holders = [0] * sched.block_manager.num_blocks
        for seq in self.added:
            for block in seq.block_table:
                holders[block] += 1
        assert holders == sched.block_manager.ref_counts.tolist()

    @invariant()
    def admission_is_fcfs(self):
        if not hasattr(self, "sched"):
            return
        firsts = [s.first_scheduled_time for s in self.added if s.first_scheduled_time is not None
                  and s.finish_reason != "abort"]
        assert firsts == sorted(firsts)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        limit = 10 * sum(s.num_prompt_tokens + s.max_tokens for s in self.added) + 10
        while self.sched.has_unfinished():   # drive to the end: everything finishes
            self.step(tokens=[1] * 64)
            limit -= 1
            assert limit > 0, "no progress: starvation or livelock"
        for seq in self.added:
            assert seq.status is FINISHED
            if seq.finish_reason != "abort":
                assert seq.arrival_time <= seq.first_scheduled_time <= seq.first_token_time <= seq.finish_time
                assert len(seq.token_times) == seq.num_output_tokens
        bm = self.sched.block_manager
        assert bm.num_free_blocks == bm.num_blocks


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=150, stateful_step_count=40)


# ---- example tests: the vLLM behaviours of DESIGN.md ------------------------------------

def make(policy="chunked", num_blocks=64, block_size=4, max_num_seqs=8, budget=32, threshold=0,
         caching=True, max_model_len=256):
    return Scheduler(SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=budget, max_model_len=max_model_len,
                                     long_prefill_token_threshold=threshold),
                     CacheConfig(block_size=block_size, enable_prefix_caching=caching), num_blocks)


def run_step(sched, now=0.0, token=1):
    batch = sched.schedule(now)
    sched.update(batch, [token] * len(batch), now + 1)
    return batch


def test_chunked_mixes_decode_and_prefill_running_first():
    sched = make(budget=16)
    a = Sequence("a", list(range(10)), 5, ignore_eos=True)
    sched.add(a)
    run_step(sched)                          # a's whole prompt
    b = Sequence("b", list(range(100, 140)), 5, ignore_eos=True)
    sched.add(b)
    batch = run_step(sched, 1)
    assert batch.seqs == [a, b]              # running first, then the new prompt
    assert batch.num_new_tokens == [1, 15]   # b chunked to the budget left
    assert batch.sample == [True, False]
    assert batch.num_decode_seqs == 1 and batch.num_prefill_tokens == 15


def test_long_prefill_threshold_caps_chunks():
    sched = make(budget=32, threshold=8)
    sched.add(Sequence("a", list(range(20)), 2, ignore_eos=True))
    sched.add(Sequence("b", list(range(50, 70)), 2, ignore_eos=True))
    assert run_step(sched).num_new_tokens == [8, 8]


def test_prefill_first_does_not_mix_and_chunks_only_the_first():
    sched = make("prefill_first", budget=16)
    a = Sequence("a", list(range(6)), 3, ignore_eos=True)
    sched.add(a)
    run_step(sched)
    sched.add(Sequence("b", list(range(100, 120)), 3, ignore_eos=True))
    sched.add(Sequence("c", list(range(200, 204)), 3, ignore_eos=True))
    batch = run_step(sched, 1)
    assert [s.seq_id for s in batch.seqs] == ["b"] and batch.num_new_tokens == [16]
    batch = run_step(sched, 2)               # b's rest, then c: still no decode for a
    assert [s.seq_id for s in batch.seqs] == ["b", "c"] and batch.num_decode_seqs == 0
    batch = run_step(sched, 3)
    assert batch.num_prefill_tokens == 0 and batch.num_decode_seqs == 3


def test_preemption_takes_the_newest_and_recomputes():
    sched = make(num_blocks=6, block_size=4, budget=64)
    old = Sequence("old", list(range(8)), 12, ignore_eos=True)
    new = Sequence("new", list(range(50, 58)), 12, ignore_eos=True)
    sched.add(old)
    sched.add(new)
    run_step(sched)                          # 4 blocks used, 2 free
    preempted = None
    for t in range(1, 20):
        batch = run_step(sched, t)
        if batch.num_preempted:
            preempted = t
            break
    assert preempted is not None
    assert new.num_preemptions == 1 and old.num_preemptions == 0
    assert new.status is WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert sched.waiting[0] is new
    assert [s.seq_id for s in batch.seqs] == ["old"]   # no admission in a step that preempted
    kept = new.output_token_ids
    while sched.has_unfinished():
        run_step(sched, 100)
    assert new.output_token_ids[:len(kept)] == kept and new.num_output_tokens == 12


def test_prefix_hit_reuses_blocks_and_skips_their_compute():
    sched = make(block_size=4, budget=64)
    system = list(range(1, 13))              # 3 full blocks
    a = Sequence("a", system + [20, 21], 1, ignore_eos=True)
    sched.add(a)
    run_step(sched)
    b = Sequence("b", system + [30], 2, ignore_eos=True)
    sched.add(b)
    batch = sched.schedule(5)
    assert b.num_cached_tokens == 12 and batch.prefix_hit_tokens == 12
    assert batch.num_computed_tokens == [12] and batch.num_new_tokens == [1]
    assert b.block_table[:3] == a.block_table[:3] if a.block_table else True


def test_fully_cached_prompt_still_computes_its_last_token():
    sched = make(block_size=4)
    a = Sequence("a", list(range(8)), 1, ignore_eos=True)
    sched.add(a)
    run_step(sched)
    b = Sequence("b", list(range(8)), 1, ignore_eos=True)
    sched.add(b)
    batch = sched.schedule(1)
    assert b.num_cached_tokens == 4 and batch.num_new_tokens == [4]


def test_eos_stops_unless_ignored():
    sched = make()
    stop = Sequence("stop", [1, 2], 10, eos_token_id=7)
    keep = Sequence("keep", [1, 3], 10, eos_token_id=7, ignore_eos=True)
    sched.add(stop)
    sched.add(keep)
    run_step(sched, token=7)
    assert stop.finish_reason == "stop" and stop.output_token_ids == [7]
    assert keep.status is RUNNING


@given(prompt=st.integers(1, 300), max_tokens=st.integers(1, 300))
def test_requests_that_can_never_run_are_rejected_at_add(prompt, max_tokens):
    sched = make(num_blocks=16, block_size=4, max_model_len=128)
    seq = Sequence("r1", [1] * prompt, max_tokens)
    if prompt + max_tokens > 128:
        with pytest.raises(ValueError, match="'r1'.*max_model_len=128"):
            sched.add(seq)
    elif prompt + max_tokens - 1 > 64:
        with pytest.raises(ValueError, match="'r1'.*whole pool has 16"):
            sched.add(seq)
    else:
        sched.add(seq)
        assert sched.num_waiting == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_size=0), "block_size"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(policy="fifo"), "policy"),
    (dict(budget=4, max_num_seqs=8), "max_num_batched_tokens"),
    (dict(budget=8, max_num_seqs=8, block_size=16), "smaller than one KV block"),
    (dict(threshold=-1), "long_prefill_token_threshold"),
])
def test_bad_configs_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_abort_frees_blocks():
    sched = make()
    a = Sequence("a", list(range(10)), 5)
    sched.add(a)
    run_step(sched)
    assert sched.block_manager.num_used_blocks > 0
    assert sched.abort("a") and not sched.abort("a")
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()
