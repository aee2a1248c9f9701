"""`decode_work_items`: the split-KV plan's items (programs per KV head), each with fixed
work. A step's count from a batch and from a decode stretch, the fit learning a per-item
cost where the profile has one (and leaving it out where it has none), and the reason it
exists: the cost of a growing context is concave while items are added, which a cost linear
in context at each batch size misprices in the middle."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import CacheConfig, SchedulerConfig
from policy.decode_plan import DecodePlan
from simulator import Simulator
from simulator.calibrate import fit_calibration
from simulator.profile_grid import shape_batch
from simulator.cost_model import CudaGraphs, FittedCostModel
from tests.test_cost_model_span import H200, META, grid_features
from tests.test_fast_forward import LinearCost, observed, skipped_and_reference, workloads


def test_items_are_the_plans_shares_padding_rows_included():
    one = shape_batch([(4096, 1)], 16, 4096, H200).features()
    assert one["decode_work_items"] == int(H200.shares([4096])[3].sum()) > 1     # one long decode, split
    # 3 decodes replayed from the 4-row graph: the padding row is a one-token item of its own
    short = H200.min_tokens_per_split - 4     # below the shortest share: one item each
    three = shape_batch([(short, 1)] * 3, 16, 4096, H200).features()
    assert three["decode_work_items"] == 4
    # items grow with the batch's context up to the plan's target, then stay (the concave part)
    items = [shape_batch([(c, 1)] * 8, 16, 1 << 16, H200).features()["decode_work_items"] for c in (256, 1024, 4096, 8192)]
    assert items == sorted(items) and items[0] < items[1] and items[-1] <= H200.target + 8
    assert "decode_work_items" not in shape_batch([(4096, 1)], 16, 4096).features()   # no plan: no count


def items_profile(per_item: float) -> pd.DataFrame:
    """The grid with a known cost: per_item s for every item of the plan, beside the KV read,
    the span and the prefill work."""
    rows = []
    for f, kind, padded, split in grid_features():
        device = (1.2e-3 + 2e-7 * padded + 1e-8 * f["decode_context_tokens"] + 4e-8 * f["decode_span_tokens"]
                  + per_item * f["decode_work_items"] + 1e-12 * f["prefill_attention_pairs"]
                  + 2e-9 * f["prefill_kv_tokens"])
        rows.append({**f, "kind": kind, "rows": padded, "split": split, "device_s": device,
                     "host_launch_s": 2e-4, "host_receive_s": 5e-5})
    return pd.DataFrame(rows)


def test_fit_learns_the_per_item_cost_and_the_simulator_records_the_count():
    calib = fit_calibration(items_profile(5e-6), META)
    fit = calib["kinds"]["decode"]
    assert fit["coefficients"]["decode_work_items"] == pytest.approx(5e-6, rel=0.05)
    assert fit["held_out"]["mape"] < 1e-3
    assert fit["forms"][f"{fit['form']} without decode_work_items"] > 3e-3     # it matters
    model = FittedCostModel(calib, graphs=CudaGraphs.for_engine(256, 8192, 8192))
    assert "decode_work_items" in model.plan_features
    requests = [type("R", (), dict(request_id=f"r{i}", arrival_s=0.01 * i,
                                   prompt_token_ids=tuple(range(1, 300 + 400 * i)), output_len=40))()
                for i in range(12)]
    run = Simulator(SchedulerConfig(), CacheConfig(), model, 4096).run(requests)
    assert all(s["decode_work_items"] >= s["decode_split_seqs"] for s in run.steps)
    assert any(s["decode_work_items"] > s["num_decode_seqs"] for s in run.steps)   # splits add items


class ItemsCost(LinearCost):
    """LinearCost plus the items: a stretch step with a wrong count changes the times."""
    decode_plan = DecodePlan(2, 3, (1, 2, 4, 8))    # 2 slots: small batches already split

    def predict(self, f: dict) -> float:
        return super().predict(f) + 4.3e-6 * f["decode_work_items"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.booleans())
def test_event_skipping_counts_items_as_step_by_step_does(workload, async_scheduling):
    skipped, reference = skipped_and_reference(ItemsCost(), workload, async_scheduling)
    assert observed(skipped) == observed(reference)
    assert all("decode_work_items" in s for s in reference.steps)


def test_without_items_a_linear_fit_prices_the_middle_of_a_concave_cost_low():
    # a profile whose attention costs a fixed 5 us per item: the fit without the count,
    # linear in context at each batch size, is biased low on mid-context batches of a few
    # decodes (serving's usual step) and high at the ends
    profile = items_profile(5e-6)
    without = fit_calibration(profile.drop(columns=["decode_work_items"]), META)
    graphs = CudaGraphs.for_engine(256, 8192, 8192)
    model = FittedCostModel(without, graphs=graphs)
    mid = profile[(profile["kind"] == "decode") & profile["rows"].between(4, 16)
                  & (profile["decode_context_tokens"] / profile["num_seqs"]).between(700, 3000)]
    err = np.array([model.predict(r) for r in mid.to_dict("records")]) / mid["device_s"] - 1
    assert len(mid) >= 10 and err.mean() < -0.005
