"""`decode_span_tokens`: the decode attention's longest chain of work under the engine's
split-KV plan (policy.decode_plan). The same plan as the kernel's work list, the same
feature from the scheduler, a decode stretch and the calibration grid; the fitted model
learning it, carrying the plan, and refusing runs recorded without it."""
import heapq
import json
from functools import cache

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.kernels.launch import decode_work_capacity, plan_decode_work
from policy import Batch, CacheConfig, Scheduler, SchedulerConfig, Sequence
from policy.cuda_graphs import decode_sizes
from policy.decode_plan import DECODE_BLOCK_N, PROGRAM_OVERHEAD_TILES, DecodePlan
from simulator import Simulator, calibrate
from simulator.calibrate import fit_calibration, step_errors
from simulator.profile_grid import profile_grid, shape_batch
from simulator.cost_model import CostModel, CudaGraphs, FittedCostModel
from tests.test_fast_forward import LinearCost, observed, skipped_and_reference, workloads

H200 = DecodePlan(8, 132, tuple(decode_sizes(256, 8192)))
META = {"model": "qwen3-0.6b", "device": "stand-in", "command": "pytest", "decode_plan": H200.describe()}


def kernel_span(contexts, kv_heads=8, sms=132):
    """The span from the engine's own work list (plan_decode_work), scheduled by a heap:
    each item, in order, to the slot that frees first."""
    n = len(contexts)
    items = np.zeros((decode_work_capacity(n, DecodePlan(kv_heads, sms)), 4), np.int32)
    index = np.zeros((n, 2), np.int32)
    count = plan_decode_work(np.array(contexts), DecodePlan(kv_heads, sms), items, index)
    cost = [-(-(end - start) // DECODE_BLOCK_N) + PROGRAM_OVERHEAD_TILES for _, start, end, _ in items[:count]]
    slots = [0] * DecodePlan(kv_heads, sms).target
    for c in cost:
        heapq.heappush(slots, heapq.heappop(slots) + c)
    return max(slots) * DECODE_BLOCK_N


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 9000), min_size=1, max_size=300), st.sampled_from([(8, 132), (4, 132), (2, 108), (1, 16)]))
def test_span_is_the_kernel_plan_list_scheduled(contexts, geometry):
    plan = DecodePlan(*geometry)
    assert plan.span_tokens(contexts, decode_only=False) == kernel_span(contexts, *geometry)


def test_unequal_contexts_and_a_second_wave_cost_more_than_their_sum_says():
    # one wave (items <= target): the largest share
    exact = DecodePlan(8, 132, split_slack=1.0, min_tokens_per_split=128)   # 1024 tokens: 8 shares of 128
    assert exact.span_tokens([1024], False) == (1024 // 64 // 8 + PROGRAM_OVERHEAD_TILES) * 64 == 256
    finer = DecodePlan(8, 132, split_slack=1.0, min_tokens_per_split=64)    # 16 shares of 64
    assert finer.span_tokens([1024], False) == (1024 // 64 // 16 + PROGRAM_OVERHEAD_TILES) * 64 == 192
    assert H200.span_tokens([1024], False) == kernel_span([1024])
    uniform = H200.span_tokens([2048] * 32, False)
    spread = H200.span_tokens([int(2048 * (0.25 + 1.5 * i / 31)) for i in range(32)], False)
    assert sum(int(2048 * (0.25 + 1.5 * i / 31)) for i in range(32)) <= 2048 * 32
    assert spread > uniform    # less context in all, a longer chain
    assert H200.span_tokens([], True) == 0


def test_a_decode_graph_plans_its_padding_rows():
    contexts = [3000] * 17            # replays the 32-row decode graph: 15 one-token rows
    assert H200.span_tokens(contexts, decode_only=True) == kernel_span(contexts + [1] * 15)
    assert H200.span_tokens(contexts, decode_only=False) == kernel_span(contexts)   # mixed: no padding
    assert DecodePlan(8, 132).span_tokens(contexts, True) == kernel_span(contexts)  # no graphs
    with pytest.raises(ValueError, match="num_kv_heads must be an integer >= 1"):
        DecodePlan(0, 132)
    with pytest.raises(ValueError, match="split_slack must be >= 1"):
        DecodePlan(8, 132, split_slack=0.5)


def test_batch_features_carry_the_span_only_with_a_plan():
    shape = [(3000, 1), (500, 1), (700, 700), (40, 1)]      # three decodes and a prompt chunk
    f = shape_batch(shape, 16, 4096, H200).features()
    assert f["decode_span_tokens"] == kernel_span([3000, 500, 40])
    assert "decode_span_tokens" not in shape_batch(shape, 16, 4096).features()
    decodes = [(c, 1) for c in (3000, 500, 40)]
    assert shape_batch(decodes, 16, 4096, H200).features()["decode_span_tokens"] == kernel_span([3000, 500, 40, 1])


class SpanCost(LinearCost):
    """LinearCost plus the span: a stretch step with a wrong span changes the times."""
    decode_plan = DecodePlan(2, 3, (1, 2, 4, 8))    # 2 slots: small batches run past one wave

    def predict(self, f: dict) -> float:
        return super().predict(f) + 3.1e-6 * f["decode_span_tokens"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.booleans())
def test_event_skipping_records_the_span_step_by_step_does(workload, async_scheduling):
    skipped, reference = skipped_and_reference(SpanCost(), workload, async_scheduling)
    assert observed(skipped) == observed(reference)
    assert all("decode_span_tokens" in s for s in reference.steps)


def test_the_scheduler_gives_its_plan_to_every_batch():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256),
                      CacheConfig(block_size=16), 64, decode_plan=H200)
    for i in range(3):
        sched.add(Sequence(i, list(range(1, 40 + 10 * i)), 5, ignore_eos=True))
    batch = sched.schedule(0.0)
    assert batch.decode_plan is H200 and "decode_span_tokens" in batch.features()
    assert CostModel.decode_plan is None     # a model that prices no span asks for none


# ---- the fitted model -------------------------------------------------------------------
@cache
def grid_features():
    graphs = CudaGraphs.for_engine(256, 8192, 8192)
    out = []
    for p in profile_grid(256, 8192, 8192, graphs):
        f = shape_batch(p["shape"], 16, 66803, H200).features()
        out.append((f, *graphs.rows(f), p["split"]))
    return out


def span_profile(per_span=4e-8):
    """The grid with a known cost whose decode attention follows the span (`per_span` s a
    token of it) besides the KV read."""
    rows = []
    for f, kind, padded, split in grid_features():
        device = (1.2e-3 + 2e-7 * padded + 1e-8 * f["decode_context_tokens"] + per_span * f["decode_span_tokens"]
                  + 1e-12 * f["prefill_attention_pairs"] + 2e-9 * f["prefill_kv_tokens"])
        rows.append({**f, "kind": kind, "rows": padded, "split": split, "device_s": device,
                     "host_launch_s": 2e-4, "host_receive_s": 5e-5})
    return pd.DataFrame(rows)


def test_fit_learns_the_span_and_carries_the_plan(tmp_path, capsys):
    profile = span_profile()
    calib = fit_calibration(profile, META)
    assert calib["decode_plan"] == META["decode_plan"]
    for kind in ("decode", "mixed"):
        fit = calib["kinds"][kind]
        assert fit["coefficients"]["decode_span_tokens"] == pytest.approx(4e-8, rel=0.05), kind
        assert fit["held_out"]["mape"] < 1e-3
        assert fit["forms"][f"{fit['form']} without decode_span_tokens"] > 1e-3   # it matters
    graphs = CudaGraphs.for_engine(256, 8192, 8192)
    model = FittedCostModel(calib, graphs=graphs)
    assert model.decode_plan == H200
    # the simulator plans with the rule of the engine the file profiled, not today's
    older = FittedCostModel({**calib, "decode_plan": {**calib["decode_plan"], "split_slack": 1.0}}, graphs=graphs)
    contexts = [1100] * 64       # just over the chunk: one share each with the slack, two without
    assert older.decode_plan.span_tokens(contexts, False) != model.decode_plan.span_tokens(contexts, False)
    with pytest.raises(ValueError, match="unknown fields"):
        FittedCostModel({**calib, "decode_plan": {**calib["decode_plan"], "slack": 1.0}})
    # the simulator records the span of every step for a model that prices it
    requests = [type("R", (), dict(request_id=f"r{i}", arrival_s=0.01 * i, prompt_token_ids=tuple(range(1, 300 + 50 * i)),
                                   output_len=40))() for i in range(12)]
    run = Simulator(SchedulerConfig(), CacheConfig(), model, 4096).run(requests)
    assert all("decode_span_tokens" in s for s in run.steps)
    # a run recorded without the span cannot be checked against it: said so
    old = pd.DataFrame(run.steps).drop(columns=["decode_span_tokens"])
    with pytest.raises(ValueError, match="no decode_span_tokens .* record the run again"):
        step_errors(calib, graphs, old)
    assert sum(e["n"] for e in step_errors(calib, graphs, pd.DataFrame(run.steps)).values()) == len(run.steps)
    # a file that prices the span without the plan is refused
    with pytest.raises(ValueError, match="no decode_plan"):
        FittedCostModel({k: v for k, v in calib.items() if k != "decode_plan"})
    # metadata without the plan: the span is not fitted, said so
    bare = fit_calibration(profile, {k: v for k, v in META.items() if k != "decode_plan"})
    assert "fitted without decode_span_tokens" in capsys.readouterr().out
    assert "decode_plan" not in bare and FittedCostModel(bare).decode_plan is None
    # the CLI re-fits a saved profile with its calibration's plan
    profile.to_parquet(tmp_path / "c.profile.parquet")
    (tmp_path / "c.json").write_text(json.dumps(calib))
    calibrate.main([str(tmp_path / "c.profile.parquet"), "--out", str(tmp_path / "refit.json")])
    assert json.loads((tmp_path / "refit.json").read_text())["decode_plan"] == META["decode_plan"]
