"""A calibration's own attention_block_cost (experiments.block_cost: the block size's cost
measured on the model's steps): the factors' fit, the shapes it times, and the fitted model
pricing a run's block size by it instead of the hardware's."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from simulator import CudaGraphs, FittedCostModel
from simulator.hardware import HardwareSpec

REPO = Path(__file__).resolve().parents[1]
QWEN = REPO / "simulator/calibrations/qwen3-0.6b-h200-tp1.json"
block_cost = pytest.importorskip("experiments.block_cost")


@settings(max_examples=50, deadline=None)
@given(f_decode=st.floats(0.5, 1.5), f_prefill=st.floats(0.5, 1.5), seed=st.integers(0, 2**31 - 1))
def test_the_factors_are_recovered_from_step_times_they_made(f_decode, f_prefill, seed):
    rng = np.random.default_rng(seed)
    n = 12
    c_decode = rng.uniform(0, 1e-3, n) * (rng.random(n) < 0.8)
    c_prefill = rng.uniform(0, 2e-3, n) * (np.arange(n) % 2 == 0)
    t_p = 1e-3 + c_decode + c_prefill + rng.uniform(0, 1e-3, n)
    t_b = t_p + (f_decode - 1) * c_decode + (f_prefill - 1) * c_prefill
    got = block_cost.fit_factors(t_p, t_b, c_decode, c_prefill)
    assert got["decode"] == pytest.approx(f_decode, abs=1e-9)
    assert got["prefill"] == pytest.approx(f_prefill, abs=1e-9)
    assert np.allclose(block_cost.relative_error(
        t_p, t_b, pd.DataFrame({"c_decode": c_decode, "c_prefill": c_prefill}), got), 0, atol=1e-9)


def test_a_kernel_no_shape_exercises_gets_no_factor():
    t_p = np.array([1e-3, 2e-3])
    got = block_cost.fit_factors(t_p, t_p * 1.1, np.array([1e-4, 3e-4]), np.zeros(2))
    assert set(got) == {"decode"} and got["decode"] > 1
    assert block_cost.fit_factors(t_p, t_p, np.zeros(2), np.zeros(2)) == {}


def test_the_calibrations_own_block_cost_replaces_the_hardwares():
    calib = json.loads(QWEN.read_text())
    graphs = CudaGraphs.for_calibration(calib["engine"])
    hw = HardwareSpec(name="h", peak_tflops=989.0, hbm_bandwidth_gbs=4800.0, memory_gib=141.0,
                      attention_block_cost={"decode": {16: 1.0, 64: 0.9}, "prefill": {16: 1.0, 64: 0.8}})
    assert FittedCostModel(calib, graphs=graphs, hw=hw, block_size=64).attn_factors == \
        pytest.approx({"decode": 0.9, "prefill": 0.8})
    own = {**calib, "attention_block_cost": {"decode": {"16": 1.0, "32": 1.2, "64": 0.5}}}
    model = FittedCostModel(own, graphs=graphs, hw=hw, block_size=64)
    assert model.attn_factors == {"decode": 0.5}           # the file's table, prefill unscaled
    assert FittedCostModel(own, graphs=graphs, block_size=32).attn_factors == {"decode": 1.2}  # no hardware needed
    assert FittedCostModel(own, graphs=graphs, block_size=16).attn_factors == {"decode": 1.0}
    step = {"num_seqs": 32, "num_batched_tokens": 32, "num_prefill_tokens": 0, "num_decode_seqs": 32,
            "num_sampled": 32, "decode_context_tokens": 32 * 2048, "decode_distinct_context_tokens": 32 * 2048,
            "prefill_context_tokens": 0, "prefill_attention_pairs": 0, "prefill_kv_tokens": 0,
            "max_context_tokens": 2048, "prefill_max_context_tokens": 0}
    step.update(FittedCostModel(calib, graphs=graphs).decode_plan.step_features([2048] * 32, True))
    at16 = FittedCostModel(own, graphs=graphs, block_size=16).predict(step)
    assert FittedCostModel(own, graphs=graphs, block_size=64).predict(step) < at16 \
        < FittedCostModel(own, graphs=graphs, block_size=32).predict(step)
    with pytest.raises(ValueError, match="attention_block_cost.decode has key 'x'"):
        FittedCostModel({**calib, "attention_block_cost": {"decode": {"x": 1.0}}}, source="f.json", block_size=32)


def test_the_shapes_timed_are_each_kinds_spread_over_their_attention_share():
    calib = json.loads(QWEN.read_text())
    graphs = CudaGraphs.for_calibration(calib["engine"])
    profile = pd.read_parquet(QWEN.with_suffix(".profile.parquet"))
    shapes = block_cost.choose_shapes(calib, graphs, profile, per_kind=8)
    assert set(shapes["kind"]) <= set(block_cost.KINDS) and (shapes.groupby("kind").size() <= 8).all()
    assert (shapes["share"] > 0).all() and (shapes["price_s"] > 0).all()
    decodes = shapes[shapes["kind"] == "decode"]
    assert len(decodes) == 8 and (decodes["c_prefill"] == 0).all() and (decodes["c_decode"] > 0).all()
    assert decodes["share"].is_monotonic_increasing and decodes["share"].iloc[-1] > 2 * decodes["share"].iloc[0]
    # a kernel's part is what its attention terms add to the price: the same decodes over
    # twice the context have a larger one, and no prefill part
    steps = [[(1024, 1)] * 8, [(2048, 1)] * 8]
    from simulator.profile_grid import shape_batch
    plan = FittedCostModel(calib, graphs=graphs).decode_plan
    parts = block_cost.attention_parts(calib, graphs, [shape_batch(s, 16, 1 << 16, plan).features() for s in steps])
    assert 0 < parts[0, 1] < parts[1, 1] and (parts[:, 2] == 0).all() and (parts[:, 1] < parts[:, 0]).all()
    with pytest.raises(ValueError, match="no shape column"):
        block_cost.choose_shapes(calib, graphs, profile.drop(columns=["shape"]))
