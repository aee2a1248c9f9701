"""Event skipping gives exactly the turn-by-turn loop's result: every request's token ids
and timestamps, every step record, every counter, on random workloads (arrivals with ties,
shared prefixes, tiny pools that preempt, both policies, several block sizes, asynchronous
scheduling on and off, host time hidden by the device or not). The reference loop runs with
every block hashed and entered at once (no deferred registration, policy.block_manager)."""
from dataclasses import dataclass
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import Batch, BlockManager, CacheConfig, Scheduler, SchedulerConfig, Sequence
from policy.fast_forward import plan_decode_stretch
from simulator import Simulator
from simulator.clock import ClockTerm
from simulator.cost_model import CostModel
from simulator.hardware import HostCosts


@dataclass(frozen=True)
class Req:
    request_id: str
    arrival_s: float
    prompt_token_ids: tuple
    output_len: int


class LinearCost(CostModel):
    """Stateless, and reads kv_blocks_used and the distinct KV read (prefix-cache hits): a
    wrong per-step feature changes the times."""

    def __init__(self, host: HostCosts = HostCosts(), clock: ClockTerm | None = None):
        self.host, self.clock = host, clock

    def predict(self, f: dict) -> float:
        return (1.3e-3 + 2.9e-6 * f["num_batched_tokens"] + 7.1e-7 * f["decode_context_tokens"]
                + 3.3e-7 * f["decode_distinct_context_tokens"]
                + 3.7e-6 * f["kv_blocks_used"] + 1.1e-5 * f["num_seqs"])


PREFIXES = [(), tuple(range(1, 10)), (7,) * 21]
# the GPU clock's state carried from step to step (every step's time depends on the ones before)
CLOCK = ClockTerm(0.005, {"decode": 0.4, "prompt": 0.6}, {"token": 2e11, "sampled": 1e10, "pair": 1e7})


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


def skipped_and_reference(cost, workload, async_scheduling: bool):
    """A workload simulated with event skipping and turn by turn on `cost`: (skipped, reference)."""
    sched, cache, num_blocks, requests = workload

    def run(skip: bool):
        return Simulator(sched, cache, cost, num_blocks, async_scheduling=async_scheduling,
                         event_skipping=skip).run(requests)
    return run(True), run(False)


def observed(result):
    seqs = [(s.seq_id, list(s.token_ids), s.token_times, s.first_scheduled_time, s.finish_time,
             s.finish_reason, s.num_preemptions, s.num_cached_tokens, s.num_computed_tokens)
            for s in result.sequences]
    return seqs, result.steps, result.cache_stats, result.duration_s


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.integers(0, 3), st.booleans(),
       st.sampled_from([HostCosts(), HostCosts(2e-4, 3e-6, 1e-4, 2e-6), HostCosts(3e-3, 1e-5, 2e-3, 1e-5),
                        HostCosts(2e-4, 3e-6, 1e-4, 2e-6, launch_token_s=2e-7, launch_prompt_s=4e-4),
                        HostCosts(2e-4, 3e-6, 1e-4, 2e-6, launch_prompt_s=4e-4, admit_s=2e-4, admit_token_s=3e-7)]),
       st.sampled_from([None, CLOCK]))
def test_event_skipping_matches_step_by_step(workload, seed, async_scheduling, host, clock):
    sched, cache, num_blocks, requests = workload

    def run(skip: bool, defer: bool):
        with mock.patch.object(BlockManager, "defer_registration", defer):
            return Simulator(sched, cache, LinearCost(host, clock), num_blocks, seed=seed,
                             async_scheduling=async_scheduling, event_skipping=skip).run(requests)
    reference = run(skip=False, defer=False)
    deferred, skipped = run(skip=False, defer=True), run(skip=True, defer=True)
    assert observed(deferred) == observed(reference)
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


def run_stretch(sched: Scheduler, tokens: dict, times: list[float]):
    """A stretch from the scheduler's state, one step per time while it can take them,
    closed with every step received (no asynchronous scheduling)."""
    stretch = plan_decode_stretch(sched, tokens)
    records = []
    for t in times:
        record = stretch.schedule(t)
        if record is None:
            break
        stretch.update(t)
        records.append(record)
    return records, stretch.close(times[:len(records)])


def run_steps(sched: Scheduler, tokens: dict, times: list[float]):
    """The reference: schedule + update, one step per time."""
    records, done = [], []
    for t in times:
        batch = sched.schedule(t)
        records.append(batch.record(t, 0.0))
        done += sched.update(batch, [tokens[s.seq_id] for s in batch.seqs], t)
    return records, done


def state(sched: Scheduler, seqs: list[Sequence]):
    bm = sched.block_manager
    return ([(list(s.token_ids), s.token_times, s.num_tokens, s.num_computed_tokens, s.block_table,
              s.num_registered_blocks, s.block_hashes, s.status, s.finish_time, s.first_scheduled_time)
             for s in seqs], [s.seq_id for s in sched.running], [s.seq_id for s in sched.waiting],
            bm.free_list(), bm.cached, bm.stats)


def twins(make):
    """Two schedulers in the same state, from `make()` -> (scheduler, sequences)."""
    return make(), make()


def three_requests(num_blocks: int, policy: str = "chunked"):
    """a and b decoding (4-token prompts, block size 4; b stops after 6 tokens), c waiting
    for a slot (max_num_seqs 2), sharing a's prompt prefix."""
    def make():
        sched = Scheduler(SchedulerConfig(policy=policy, max_num_seqs=2, max_num_batched_tokens=64),
                          CacheConfig(block_size=4), num_blocks)
        seqs = [Sequence("a", [1, 2, 3, 4, 5], 30, ignore_eos=True),
                Sequence("b", [5, 6, 7, 8], 6, ignore_eos=True),
                Sequence("c", [1, 2, 3, 4, 9, 9, 9, 9, 9], 40, ignore_eos=True)]
        for seq in seqs:
            sched.add(seq)
        batch = sched.schedule(0.0)
        sched.update(batch, [9] * len(batch), 1.0)
        return sched, seqs
    return make


TOKENS = {"a": 9, "b": 9, "c": 7}


def test_a_stretch_is_the_scheduler_through_finishes_and_admissions():
    """b finishes inside the stretch, c is admitted to its slot as a prefill chunk and then
    decodes with a, and every block, cache entry, token and time is the scheduler's."""
    (sched, seqs), (ref, ref_seqs) = twins(three_requests(num_blocks=40))
    times = [float(t) for t in range(2, 30)]
    records, done = run_stretch(sched, TOKENS, times)
    assert len(records) == len(times)      # nothing ended it
    assert any(r["num_prefill_tokens"] for r in records[1:])   # c's prompt, mid-stretch
    ref_records, ref_done = run_steps(ref, TOKENS, times)
    assert records == ref_records
    assert [s.seq_id for s in done] == [s.seq_id for s in ref_done] == ["b"]
    assert state(sched, seqs) == state(ref, ref_seqs)
    sched.block_manager.check_integrity()


def test_prefill_first_stops_where_a_prompt_could_run():
    (sched, seqs), (ref, ref_seqs) = twins(three_requests(num_blocks=40, policy="prefill_first"))
    times = [float(t) for t in range(2, 30)]
    records, _ = run_stretch(sched, TOKENS, times)
    assert len(records) == 5        # b finishes at the 5th step: c's prompt runs next
    run_steps(ref, TOKENS, times[:5])
    assert state(sched, seqs) == state(ref, ref_seqs)
    assert sched.schedule(8.0).num_prefill_tokens > 0


def two_decoding(num_blocks: int, max_tokens_b: int) -> tuple[Scheduler, Sequence, Sequence]:
    """a and b (4-token prompts, block size 4) after their prefill step: both decoding."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), CacheConfig(block_size=4), num_blocks)
    a = Sequence("a", [1, 2, 3, 4], 30, ignore_eos=True)
    b = Sequence("b", [5, 6, 7, 8], max_tokens_b, ignore_eos=True)
    sched.add(a), sched.add(b)
    batch = sched.schedule(0.0)
    sched.update(batch, [9, 9], 1.0)
    return sched, a, b


def test_a_finish_inside_a_stretch():
    sched, a, b = two_decoding(num_blocks=40, max_tokens_b=6)
    records, done = run_stretch(sched, {"a": 9, "b": 9}, [float(t) for t in range(2, 12)])
    assert len(records) == 10
    assert [r["num_seqs"] for r in records] == [2] * 5 + [1] * 5
    assert records[0]["kv_blocks_used"] == 4     # both take their second block at once
    assert list(records[0]) == list(Batch().record(0.0, 0.0))   # the steps.parquet columns
    assert done == [b] and b.is_finished and b.finish_time == 6.0
    assert b.token_times == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and b.block_table == []
    assert sched.running == [a] and a.num_tokens == 15 and a.num_computed_tokens == 14


def test_stretch_ends_before_the_step_that_would_preempt():
    sched, a, b = two_decoding(num_blocks=9, max_tokens_b=30)
    records, _ = run_stretch(sched, {"a": 9, "b": 9}, [1.0 + j for j in range(1, 30)])
    # 7 free blocks; both need one at steps 0, 4, 8 (6 blocks), and at step 12 there is one.
    assert len(records) == 12
    assert [records[j]["kv_blocks_used"] for j in (0, 3, 4, 8, 11)] == [4, 4, 6, 8, 8]
    sched.block_manager.check_integrity()
    assert sched.schedule(14.0).num_preempted == 1     # the step after it preempts b


def roofline(model_name: str):
    import pathlib

    import yaml

    from simulator import HardwareSpec, ModelSpec
    from simulator.cost_model import RooflineCostModel
    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "conf" / "model" / f"{model_name}.yaml").read_text())
    hw = HardwareSpec(**yaml.safe_load((root / "conf" / "hardware" / "h100.yaml").read_text()))
    return lambda: RooflineCostModel(ModelSpec.from_hf_config(cfg["hf_config"], name=cfg["name"]), hw)


def test_roofline_steps_cost_what_a_fresh_model_says():
    """The roofline model computes each step shape's fixed and GEMM terms once: every step
    of a run (prompts, mixed and decode steps; dense and MoE) costs exactly what a model
    that never saw another step says, and skipping turns changes no step."""
    requests = [Req(f"r{i}", 0.01 * i, tuple(range(i, i + 20 + 7 * i)), 5 + 3 * i) for i in range(12)]
    for model_name in ("qwen3-0.6b", "qwen3-30b-a3b"):
        make = roofline(model_name)
        runs = [Simulator(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), CacheConfig(block_size=4),
                          make(), num_blocks=200, event_skipping=skip).run(requests) for skip in (False, True)]
        assert observed(runs[0]) == observed(runs[1])
        assert {step["num_prefill_tokens"] > 0 for step in runs[1].steps} == {True, False}
        for step in runs[1].steps:
            assert step["device_s"] == make().predict(step)
