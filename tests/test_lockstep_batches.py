"""Lockstep decode batches (every decode of one context length) are profiled but not fitted
(simulator.calibrate.lockstep_batches, FIT_LOCKSTEP): serving never forms them, and on the
H200 they ran apart from the spread batches it does form."""
import json

import numpy as np
import pytest

import simulator.calibrate as calibrate
from simulator.calibrate import fit_calibration, lockstep_batches, twin_pairs
from simulator.cost_model import CudaGraphs, FittedCostModel
from tests.test_reread_curve import planted_profile

META = {"model": "qwen3-0.6b", "device": "stand-in", "command": "pytest"}
GRAPHS = CudaGraphs.for_engine(256, 8192, 8192)
LOCKSTEP_EXTRA = 0.05     # planted: a lockstep batch runs 5% over the rule spread batches follow


@pytest.fixture(scope="module")
def profile():
    return planted_profile(LOCKSTEP_EXTRA)


def test_lockstep_batches_are_the_decode_batches_of_one_context(profile):
    mask = lockstep_batches(profile)
    assert mask.any() and not mask.all()
    for _, r in profile[mask].iterrows():
        entries = json.loads(r["shape"])
        assert r["kind"] == "decode" and len(entries) > 1 and len({e[0] for e in entries}) == 1
    # single decodes, spread batches and every mixed step stay in
    kept = profile[~mask]
    assert (kept["kind"] == "mixed").sum() == (profile["kind"] == "mixed").sum()
    assert ((kept["kind"] == "decode") & (kept["num_decode_seqs"] == 1)).any()
    # a profile made before shapes were kept: nothing is left out
    assert not lockstep_batches(profile.drop(columns=["shape"])).any()


def spread_error(calibration, profile):
    """Mean error of the fitted model on the spread decode batches (held out and fitted)."""
    model = FittedCostModel(calibration, graphs=GRAPHS)
    spread = profile[(profile["kind"] == "decode") & ~lockstep_batches(profile)]
    pred = np.array([model.predict(r) for r in spread.to_dict("records")])
    return float(np.mean(pred / spread["device_s"].to_numpy() - 1))


def test_the_fit_prices_spread_batches_without_the_lockstep_ones(profile, monkeypatch):
    without = fit_calibration(profile, META)
    assert abs(spread_error(without, profile)) < 0.002
    monkeypatch.setattr(calibrate, "FIT_LOCKSTEP", True)
    with_them = fit_calibration(profile, META)
    # fitted on them too, the spread batches (serving's) are priced high
    assert spread_error(with_them, profile) > 0.005


def test_the_twins_still_use_lockstep_batches(profile):
    # the unshared twins of the shared shapes are lockstep batches: the re-read's saving is
    # still measured on them
    pairs = twin_pairs(profile)
    assert len(pairs) and (pairs["share"] > 0.4).any()
