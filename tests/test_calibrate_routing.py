"""How a mixture of experts routes a prompt chunk: the fitted cost model counts a chunk of n
tokens as n^a independently routed tokens (a decode as one), and the calibration fits a on
the profile's held-out shapes (simulator.calibrate.fit_chunk_routing)."""
import copy

import numpy as np
import pandas as pd
import pytest

from simulator import CudaGraphs, FittedCostModel
from simulator.calibrate import CHUNK_ROUTING_EXPONENTS, fit_calibration, moe_profile_columns
from simulator.profile_grid import moe_grid, profile_grid, shape_batch
from simulator.cost_model import moe_experts_touched, routed_tokens, routing_units

E, K = 128, 8
GRAPHS = CudaGraphs.for_engine(64, 1024, 1024)


def features(decodes=0, chunks=(), rows=None):
    n = decodes + sum(chunks)
    f = {"num_seqs": decodes + len(chunks), "num_decode_seqs": decodes,
         "num_prefill_tokens": sum(chunks), "num_batched_tokens": n}
    return f, rows or n


def test_routing_units_count_decodes_chunks_and_padding():
    f, rows = features(decodes=16)
    assert routing_units(f, rows, 0.0) == routing_units(f, rows, 1.0) == 16
    f, rows = features(decodes=16, rows=32)               # padded: one more token
    assert routing_units(f, rows, 0.5) == 17
    f, rows = features(decodes=4, chunks=(100,))
    assert routing_units(f, rows, 1.0) == routed_tokens(104, 104) == 104
    assert routing_units(f, rows, 0.0) == 5                # the chunk routes as one token
    assert routing_units(f, rows, 0.5) == pytest.approx(14)
    f, rows = features(chunks=(64, 64))                    # two chunks: each its own
    assert routing_units(f, rows, 0.0) == 2
    assert moe_experts_touched(E, K, *features(chunks=(4096,)), 1.0) == pytest.approx(E)
    assert moe_experts_touched(E, K, *features(chunks=(4096,)), 0.0) == pytest.approx(K)


def synthetic_profile(exponent: float) -> pd.DataFrame:
    """The base and MoE grids of a small engine, each step costing a fixed part, a part
    growing with its rows, attention, and the experts its routing units touch (chunks routed
    with `exponent`), plus 0.3% of deterministic noise."""
    rng = np.random.default_rng(0)
    rows = []
    for point in profile_grid(64, 1024, 2048, GRAPHS) + moe_grid(64, 1024, 2048, GRAPHS, E, K):
        f = shape_batch(point["shape"], 16, 4000).features()
        kind, padded = GRAPHS.rows(f)
        t = (1e-3 + 2e-6 * padded + 1e-9 * f["decode_context_tokens"] + 2e-9 * f["prefill_kv_tokens"]
             + 1e-4 * moe_experts_touched(E, K, f, padded, exponent))
        rows.append({**f, "kind": kind, "rows": padded, "split": point["split"],
                     "grid": point.get("grid", "base"), "device_s": t * (1 + 0.003 * rng.standard_normal()),
                     "host_launch_s": 1e-4, "host_receive_s": 1e-5})
    return moe_profile_columns(pd.DataFrame(rows), E, K)


META = {"model": "stand-in", "device": "stand-in", "command": "pytest",
        "moe": {"num_experts": E, "top_k": K, "moe_layers": 2}}


@pytest.mark.parametrize("truth", [1.0, 0.0])
def test_the_fit_finds_how_chunks_route(truth):
    profile = synthetic_profile(truth)
    calib = fit_calibration(profile, copy.deepcopy(META))
    moe = calib["moe"]
    assert moe["chunk_routing_exponent"] == truth
    assert set(moe["chunk_routing_errors"]) == {str(a) for a in CHUNK_ROUTING_EXPONENTS}
    assert calib["kinds"]["mixed"]["held_out"]["mape"] < 0.01
    # the file predicts as it was fitted: its own exponent, computed from the features
    model = FittedCostModel(calib, graphs=GRAPHS)
    held = profile[(profile["kind"] == "mixed") & (profile["split"] != "train")]
    pred = np.array([model.predict(r) for r in held.to_dict("records")])
    assert np.mean(np.abs(pred / held["device_s"].to_numpy() - 1)) < 0.01
    wrong = [a for a in CHUNK_ROUTING_EXPONENTS if abs(a - truth) == 1][0]
    assert moe["chunk_routing_errors"][str(wrong)] > 2 * moe["chunk_routing_errors"][str(truth)]


def test_a_file_without_the_exponent_routes_every_token_and_a_bad_one_is_refused():
    calib = fit_calibration(synthetic_profile(1.0), copy.deepcopy(META))
    f, rows = features(decodes=3, chunks=(200,), rows=256)
    f.update(decode_context_tokens=3000, decode_distinct_context_tokens=3000, num_sampled=4,
             prefill_attention_pairs=20100, prefill_context_tokens=40000, prefill_kv_tokens=200,
             max_context_tokens=1000)
    old = copy.deepcopy(calib)
    del old["moe"]["chunk_routing_exponent"]
    assert FittedCostModel(old, graphs=GRAPHS).predict(f) == FittedCostModel(calib, graphs=GRAPHS).predict(f)
    for bad in (1.5, -0.1, "half", True):
        calib["moe"]["chunk_routing_exponent"] = bad
        with pytest.raises(ValueError, match="chunk_routing_exponent"):
            FittedCostModel(calib, source="x.json")


def test_refit_on_the_idle_device_times_when_asked(tmp_path):
    from simulator.calibrate import main
    import json
    profile = synthetic_profile(1.0)
    profile["device_idle_s"] = 1.5 * profile["device_s"]
    path = tmp_path / "x.profile.parquet"
    profile.to_parquet(path)
    plan = {"format": "twinserve-kernel-plan/1", "device": "GPU", "skinny": {}}
    (tmp_path / "x.json").write_text(json.dumps({**META, "kernel_plan": plan}))
    main([str(path), "--out", str(tmp_path / "b2b.json")])
    # the kernels the profile ran stay pinned: a re-fit must not lose the plan
    assert json.loads((tmp_path / "b2b.json").read_text())["kernel_plan"] == plan
    main([str(path), "--out", str(tmp_path / "idle.json"), "--device-time", "device_idle_s"])
    b2b, idle = (FittedCostModel(json.loads((tmp_path / f).read_text()), graphs=GRAPHS)
                 for f in ("b2b.json", "idle.json"))
    f = profile[profile["split"] != "train"].iloc[0].to_dict()
    assert idle.predict(f) == pytest.approx(1.5 * b2b.predict(f), rel=1e-3)
    refit = json.loads((tmp_path / "idle.json").read_text())["refit"]["command"]
    assert "--device-time device_idle_s" in refit
    old = tmp_path / "old.profile.parquet"      # profiled before the idle time was recorded
    profile.drop(columns=["device_idle_s"]).to_parquet(old)
    with pytest.raises(SystemExit, match="no device_idle_s"):
        main([str(old), "--out", str(tmp_path / "y.json"), "--device-time", "device_idle_s",
              "--meta", str(tmp_path / "x.json")])
