"""Event skipping gives exactly the turn-by-turn loop's result: every request's token ids
and timestamps, every step record, every counter, on random workloads (arrivals with ties,
shared prefixes, tiny pools that preempt, both policies, several block sizes, asynchronous
scheduling on and off, host time hidden by the device or not)."""
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import Batch, CacheConfig, Scheduler, SchedulerConfig, Sequence
from policy.fast_forward import plan_decode_stretch
from simulator import Simulator
from simulator.cost_model import CostModel
from simulator.hardware import HostCosts


@dataclass(frozen=True)
class Req:
    request_id: str
    arrival_s: float
    prompt_token_ids: tuple
    output_len: int


class LinearCost(CostModel):
    """Stateless, and reads kv_blocks_used: a wrong per-step feature changes the times."""

    def __init__(self, host: HostCosts = HostCosts()):
        self.host = host

    def predict(self, f: dict) -> float:
        return (1.3e-3 + 2.9e-6 * f["num_batched_tokens"] + 7.1e-7 * f["decode_context_tokens"]
                + 3.7e-6 * f["kv_blocks_used"] + 1.1e-5 * f["num_seqs"])


PREFIXES = [(), tuple(range(1, 10)), (7,) * 21]


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    policy = draw(st.sampled_from(["chunked", "prefill_first"]))
    max_num_seqs = draw(st.integers(1, 8))
    budget = max(max_num_seqs, block_size) + draw(st.integers(0, 64))
    n = draw(st.integers(1, 24))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0, 1e-3, 4e-3, 0.02, 0.1]), min_size=n, max_size=n))
    requests, t = [], 0.0
    for i, gap in enumerate(gaps):
        t += gap
        prompt = draw(st.sampled_from(PREFIXES)) + tuple(draw(st.lists(st.integers(1, 3), max_size=40)))
        requests.append(Req(f"r{i}", t, prompt or (1,), draw(st.integers(1, 60))))
    longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    min_blocks = -(-(longest - 1) // block_size)
    num_blocks = min_blocks + draw(st.integers(0, 3 * min_blocks))   # tight pools preempt
    sched = SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                            max_model_len=longest, long_prefill_token_threshold=draw(st.sampled_from([0, 0, 7])))
    cache = CacheConfig(block_size=block_size, enable_prefix_caching=draw(st.booleans()))
    return sched, cache, num_blocks, requests


def observed(result):
    seqs = [(s.seq_id, list(s.token_ids), s.token_times, s.first_scheduled_time, s.finish_time,
             s.finish_reason, s.num_preemptions, s.num_cached_tokens, s.num_computed_tokens)
            for s in result.sequences]
    return seqs, result.steps, result.cache_stats, result.duration_s


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.integers(0, 3), st.booleans(),
       st.sampled_from([HostCosts(), HostCosts(2e-4, 3e-6, 1e-4, 2e-6), HostCosts(3e-3, 1e-5, 2e-3, 1e-5)]))
def test_event_skipping_matches_step_by_step(workload, seed, async_scheduling, host):
    sched, cache, num_blocks, requests = workload
    runs = [Simulator(sched, cache, LinearCost(host), num_blocks, seed=seed,
                      async_scheduling=async_scheduling, event_skipping=skip).run(requests)
            for skip in (False, True)]
    reference, skipped = runs
    assert observed(skipped) == observed(reference)
    assert skipped.num_iterations <= reference.num_iterations


def test_a_steady_batch_is_skipped_many_steps_at_once():
    """Eight requests at t=0, long outputs: after the prompts, stretches run to each finish."""
    requests = [Req(f"r{i}", 0.0, tuple(range(i, i + 30)), 100 + 10 * i) for i in range(8)]
    sim = Simulator(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512),
                    CacheConfig(block_size=4), LinearCost(), num_blocks=400)
    result = sim.run(requests)
    assert len(result.steps) >= 170
    assert result.num_iterations <= 20      # one prefill step, then one stretch per finish


def test_no_stretch_while_a_request_waits_to_be_admitted():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), CacheConfig(block_size=4), num_blocks=64)
    for i in range(3):
        sched.add(Sequence(i, [1, 2, 3], 20, ignore_eos=True))
    batch = sched.schedule(0.0)
    sched.update(batch, [5] * len(batch), 1.0)
    tokens = {i: 5 for i in range(3)}
    assert plan_decode_stretch(sched, tokens) is not None    # max_num_seqs running: no admission
    sched.abort(0)
    assert plan_decode_stretch(sched, tokens) is None        # now the third one gets in


def two_decoding(num_blocks: int, max_tokens_b: int) -> tuple[Scheduler, Sequence, Sequence]:
    """a and b (4-token prompts, block size 4) after their prefill step: both decoding."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), CacheConfig(block_size=4), num_blocks)
    a = Sequence("a", [1, 2, 3, 4], 30, ignore_eos=True)
    b = Sequence("b", [5, 6, 7, 8], max_tokens_b, ignore_eos=True)
    sched.add(a), sched.add(b)
    batch = sched.schedule(0.0)
    sched.update(batch, [9, 9], 1.0)
    return sched, a, b


def test_stretch_ends_at_the_first_finish():
    sched, a, b = two_decoding(num_blocks=40, max_tokens_b=6)
    stretch = plan_decode_stretch(sched, {"a": 9, "b": 9})
    assert stretch.max_steps == 5          # b reaches its 6 tokens at the 5th step
    assert stretch.features(0)["kv_blocks_used"] == 4     # both take their second block at once
    assert list(stretch.features(0)) == list(Batch().features())   # the steps.parquet columns
    finished = stretch.apply(5, [float(t) for t in range(2, 7)])
    assert finished == [b] and b.is_finished and b.finish_time == 6.0
    assert b.token_times == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and b.block_table == []
    assert sched.running == [a] and a.num_tokens == 10 and a.num_computed_tokens == 9


def test_stretch_ends_before_the_step_that_would_preempt():
    sched, a, b = two_decoding(num_blocks=9, max_tokens_b=30)
    stretch = plan_decode_stretch(sched, {"a": 9, "b": 9})
    # 7 free blocks; both need one at steps 0, 4, 8 (6 blocks), and at step 12 there is one.
    assert stretch.max_steps == 12
    assert [stretch.features(j)["kv_blocks_used"] for j in (0, 3, 4, 8, 11)] == [4, 4, 6, 8, 8]
    stretch.apply(12, [1.0 + j for j in range(1, 13)])
    sched.block_manager.check_integrity()
    assert sched.schedule(14.0).num_preempted == 1     # the step after it preempts b
