"""A re-read's saving measured on the profile's twins (simulator.calibrate.reread_curve): the
curve is the twin pairs' saving per re-read token by share, the kinds are fitted on the steps as
if unshared, and the fitted model prices a shared step at its unshared price less R x the curve
(cost_model.reread_saving)."""
import json

import numpy as np
import pandas as pd
import pytest

from simulator.calibrate import REREAD_MIN_PAIRS, fit_calibration, reread_curve, twin_pairs, unshared
from simulator.profile_grid import profile_grid, shape_batch
from simulator.cost_model import CALIBRATION_FORMAT, CudaGraphs, FittedCostModel, reread_saving

SHARED = "decode_distinct_context_tokens"
META = {"model": "qwen3-0.6b", "device": "stand-in", "command": "pytest"}
GRAPHS = CudaGraphs.for_engine(256, 8192, 8192)


def planted_saving(share):
    """Seconds a re-read token saves, as measured on the H200: flat at low shares, falling to
    half by a half share, flat after."""
    return np.interp(share, [0.2, 0.5], [24e-9, 12e-9])


def planted_profile(lockstep_extra: float = 0.0):
    """The engine grid's shapes (with their `shape`), timed as fixed + 30 ns a KV token less
    what the planted curve says each step's re-reads save; decode batches of two or more
    decodes all of one context (lockstep) that much longer again (`lockstep_extra`, a
    fraction: tests/test_lockstep_batches.py)."""
    rows = []
    for p in profile_grid(256, 8192, 8192, GRAPHS):
        f = shape_batch(p["shape"], 16, 66803).features()
        kind, padded = GRAPHS.rows(f)
        C, D = f["decode_context_tokens"], f[SHARED]
        R = C - D
        device = (1.2e-3 + 2e-7 * padded + 30e-9 * C - R * planted_saving(R / max(C, 1))
                  + 1e-12 * f["prefill_attention_pairs"] + 2e-9 * f["prefill_kv_tokens"])
        if kind == "decode" and len(p["shape"]) > 1 and len({e[0] for e in p["shape"]}) == 1:
            device *= 1 + lockstep_extra
        rows.append({**f, "kind": kind, "rows": padded, "split": p["split"], "device_s": device,
                     "host_launch_s": 2e-4, "host_receive_s": 5e-5, "shape": json.dumps(p["shape"])})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def profile():
    return planted_profile()


def test_the_curve_is_what_the_twins_save_by_share(profile):
    pairs = twin_pairs(profile)
    assert len(pairs) > 50 and (pairs["share"] > 0).all()
    # every pair's saving is the planted one at its share
    assert pairs["saving_s"].to_numpy() == pytest.approx(planted_saving(pairs["share"].to_numpy()), rel=1e-6)
    curve = reread_curve(profile)
    assert curve["pairs"] <= len(pairs) and len(curve["shares"]) >= 3
    assert curve["saving_s"] == pytest.approx(list(planted_saving(np.array(curve["shares"]))), rel=0.05)
    assert all(a >= b for a, b in zip(curve["saving_s"], curve["saving_s"][1:]))
    # a bin's noise never makes a larger share save more per token
    noisy = profile.copy()
    high = (noisy[SHARED] < noisy["decode_context_tokens"]) & (
        (noisy["decode_context_tokens"] - noisy[SHARED]) / noisy["decode_context_tokens"] > 0.6)
    noisy.loc[high, "device_s"] -= 1e-9 * 40 * (noisy["decode_context_tokens"] - noisy[SHARED])[high]
    bumped = reread_curve(noisy)
    assert bumped["saving_s"][-1] == bumped["saving_s"][-2]
    # without twins (a profile made before `shape` was kept) there is no curve
    assert reread_curve(profile.drop(columns=["shape"])) == {}
    # a bin needs REREAD_MIN_PAIRS pairs: a profile with fewer shared shapes has no curve
    shared = profile[profile[SHARED] < profile["decode_context_tokens"]]
    few = pd.concat([profile[profile[SHARED] == profile["decode_context_tokens"]],
                     shared[shared["kind"] == "decode"].head(REREAD_MIN_PAIRS - 1)])
    assert len(twin_pairs(few)) == REREAD_MIN_PAIRS - 1 and reread_curve(few) == {}


def test_unshared_steps_cost_what_their_twins_cost(profile):
    curve = reread_curve(profile)
    flat = unshared(profile, curve)
    assert (flat[SHARED] == flat["decode_context_tokens"]).all()
    keep = profile[SHARED] == profile["decode_context_tokens"]
    assert (flat.loc[keep, "device_s"] == profile.loc[keep, "device_s"]).all()
    # a shared shape, made unshared, costs about what its unshared twin costs
    twins = {json.dumps([e[:2] for e in json.loads(r["shape"])]): r["device_s"]
             for r in profile[keep].to_dict("records")}
    shared = flat[~keep].to_dict("records")
    close = [r["device_s"] / twins[k] - 1 for r in shared
             if (k := json.dumps([e[:2] for e in json.loads(r["shape"])])) in twins]
    assert close and np.median(np.abs(close)) < 0.01


def test_the_fit_prices_shared_steps_by_the_curve(profile):
    calib = fit_calibration(profile, META)
    assert calib["reread"]["shares"] == reread_curve(profile)["shares"]
    model = FittedCostModel(calib, graphs=GRAPHS)
    shared = profile[(profile["kind"] == "decode") & (profile[SHARED] < profile["decode_context_tokens"])]
    err = np.array([model.predict(r) / r["device_s"] - 1 for r in shared.to_dict("records")])
    # the same profile without its twins: one coefficient for every share
    old = FittedCostModel(fit_calibration(profile.drop(columns=["shape"]), META), graphs=GRAPHS)
    assert "reread" not in old.calibration
    err_old = np.array([old.predict(r) / r["device_s"] - 1 for r in shared.to_dict("records")])
    assert np.abs(err).mean() < 0.01 and np.abs(err).mean() < np.abs(err_old).mean() / 2


def test_a_shared_step_costs_its_unshared_price_less_the_saving():
    calib = {"format": CALIBRATION_FORMAT, "kinds": {"decode": {
        "knots": [1, 64], "base_s": [1e-3, 1e-3], "coefficients": {"decode_context_tokens": 25e-9, SHARED: 5e-9}}},
        "reread": {"shares": [0.2, 0.5], "saving_s": [20e-9, 10e-9]}}
    model = FittedCostModel(calib)
    alone = shape_batch([(2048, 1)] * 8, 16, 1 << 14).features()
    for shared_tokens, per_token in ((256, 20e-9), (1024, 10e-9 + 10e-9 * (0.5 - 7 * 1024 / 16384) / 0.3),
                                     (1920, 10e-9)):
        f = shape_batch([(2048, 1, shared_tokens, 0)] * 8, 16, 1 << 14).features()
        R = f["decode_context_tokens"] - f[SHARED]
        assert R == 7 * shared_tokens
        assert reread_saving(f, [0.2, 0.5], [20e-9, 10e-9]) == pytest.approx(R * per_token)
        assert model.predict(f) == pytest.approx(model.predict(alone) - R * per_token)
    assert reread_saving(alone, [0.2, 0.5], [20e-9, 10e-9]) == 0
    # the same rule over a table's columns
    table = pd.DataFrame([alone, shape_batch([(2048, 1, 256, 0)] * 8, 16, 1 << 14).features()])
    assert reread_saving(table, [0.2, 0.5], [20e-9, 10e-9]).tolist() == pytest.approx([0, 7 * 256 * 20e-9])
    for bad in ({"shares": [0.5, 0.2], "saving_s": [1e-9, 1e-9]}, {"shares": [0.2], "saving_s": [-1e-9]},
                {"shares": [0.2, 0.5], "saving_s": [1e-9]}, {"saving_s": [1e-9]}):
        with pytest.raises(ValueError, match="reread must be"):
            FittedCostModel({**calib, "reread": bad})


def test_every_shipped_calibration_prices_rereads_by_its_twins():
    """The shipped H200 files are fitted this way, their curves falling with the share."""
    from pathlib import Path
    files = sorted(Path("simulator/calibrations").glob("*-h200-tp*.json"))
    assert files
    for path in files:
        calib = json.loads(path.read_text())
        curve = calib.get("reread")
        assert curve, path
        assert all(a >= b for a, b in zip(curve["saving_s"], curve["saving_s"][1:])), path
        FittedCostModel(calib, source=str(path))


def test_the_saving_scales_with_the_block_size_as_decode_attention_does():
    """A run at another block size than the profiled one: the re-reads' saving is decode
    attention's time, so it takes the hardware's decode block factor, as the kinds' other
    attention terms do."""
    import yaml
    from dataclasses import replace
    from simulator import HardwareSpec
    hw = replace(HardwareSpec(**yaml.safe_load(open("conf/hardware/h200.yaml"))),
                 attention_block_cost={"decode": {16: 1.0, 64: 0.8}})
    calib = {"format": CALIBRATION_FORMAT, "engine": {"block_size": 16}, "kinds": {"decode": {
        "knots": [1, 64], "base_s": [1e-3, 1e-3], "coefficients": {"decode_context_tokens": 25e-9}}},
        "reread": {"shares": [0.2, 0.5], "saving_s": [20e-9, 10e-9]}}
    alone = shape_batch([(2048, 1)] * 8, 16, 1 << 14).features()
    shared = shape_batch([(2048, 1, 256, 0)] * 8, 16, 1 << 14).features()
    saving = {b: FittedCostModel(calib, hw=hw, block_size=b).predict(alone)
              - FittedCostModel(calib, hw=hw, block_size=b).predict(shared) for b in (16, 64)}
    assert saving[16] == pytest.approx(7 * 256 * 20e-9)
    assert saving[64] == pytest.approx(0.8 * saving[16])
