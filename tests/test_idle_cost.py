"""The idle cost (simulator.clock.IdleTerm, measured by experiments.idle_cost): what a step costs
beyond its price after the device sat idle, by the idle's length and the step's kind, and the
simulator adding it to each step by the device idle before it."""
import math

import numpy as np
import pandas as pd
import pytest

from experiments.idle_cost import extras, fit_term
from policy import CacheConfig, SchedulerConfig
from simulator import Simulator
from simulator.clock import IdleTerm
from simulator.cost_model import CostModel
from simulator.hardware import HostCosts

IDLES = (0.001, 0.01, 0.1)
TERM = {"form": "add", "idle_s": list(IDLES), "decode": [1e-4, 2e-4, 4e-4], "prompt": [0.0, 1e-4, 1e-3]}


def test_the_term_interpolates_in_log_idle_and_holds_past_the_longest():
    term = IdleTerm.from_calibration(TERM, "x.json")
    assert term.extra(0.0, 0, 0.01) == 0.0
    assert term.extra(0.0005, 0, 0.01) == pytest.approx(0.5e-4)           # linear below the shortest
    assert term.extra(0.01, 0, 0.01) == pytest.approx(2e-4)
    assert term.extra(math.sqrt(0.01 * 0.1), 0, 0.01) == pytest.approx(3e-4)   # the log midpoint
    assert term.extra(5.0, 0, 0.01) == pytest.approx(4e-4)                # held past the longest
    assert term.extra(5.0, 128, 0.01) == pytest.approx(1e-3)              # a prompt step: its kind's
    share = IdleTerm.from_calibration({**TERM, "form": "mul"})
    assert share.extra(0.01, 0, 0.02) == pytest.approx(2e-4 * 0.02)       # a share of the price
    only_decode = IdleTerm.from_calibration({k: v for k, v in TERM.items() if k != "prompt"})
    assert only_decode.extra(1.0, 64, 0.01) == 0.0
    assert IdleTerm.from_calibration(term.describe()) == term


@pytest.mark.parametrize("bad", [{"form": "pow"}, {"idle_s": [0.1, 0.01, 0.001]}, {"idle_s": [0, 0.01, 0.1]},
                                 {"decode": [1e-4, 2e-4]}, {"decode": [1e-4, float("nan"), 0]}])
def test_a_bad_idle_section_is_refused(bad):
    with pytest.raises(ValueError, match="idle_cost"):
        IdleTerm.from_calibration({**TERM, **bad}, "x.json")
    with pytest.raises(ValueError, match="idle_cost section"):
        IdleTerm.from_calibration({"form": "add"}, "x.json")
    assert IdleTerm.from_calibration(None) is None


class Flat(CostModel):
    """2 ms a step; with or without the idle term."""

    def __init__(self, idle: IdleTerm | None):
        self.host, self.idle = HostCosts(), idle

    def predict(self, f: dict) -> float:
        return 2e-3


class Request:
    def __init__(self, request_id, arrival_s, prompt_len, output_len):
        self.request_id, self.arrival_s, self.output_len = request_id, arrival_s, output_len
        self.prompt_token_ids = tuple(range(1, prompt_len + 1))


def test_the_simulator_adds_the_term_by_the_idle_before_each_step():
    """Requests 1 s apart: each one's first step follows a long idle (the first, the idle
    since start-up) and costs its kind's held value more; its later decodes follow each other
    at once and cost little more than their price."""
    requests = [Request(i, 1.0 * i, 64, 4) for i in range(3)]
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=1024)
    cache = CacheConfig(block_size=16, enable_prefix_caching=False)
    runs = {}
    for name, term in (("without", None), ("with", IdleTerm.from_calibration(TERM))):
        runs[name] = pd.DataFrame(Simulator(sched, cache, Flat(term), num_blocks=100).run(requests).steps)
    plain, idled = runs["without"], runs["with"]
    assert (plain["device_s"] == 2e-3).all()
    first = idled["num_prefill_tokens"] > 0
    assert first.sum() == 3 and (idled.loc[first, "gpu_gap_s"].iloc[1:] > 0.5).all()
    assert np.allclose(idled.loc[first, "device_s"], 2e-3 + 1e-3)
    rest = idled[~first]
    expected = [2e-3 + IdleTerm.from_calibration(TERM).extra(g, n, 2e-3)
                for g, n in zip(rest["gpu_gap_s"], rest["num_prefill_tokens"])]
    assert np.allclose(rest["device_s"], expected)
    assert (rest["device_s"] < 2e-3 + 1e-4).all()                       # back to back: little


def test_the_fit_recovers_a_planted_additive_term():
    """Timings made from a planted term (model change 0, as without a clock term): the fit
    picks the additive form and returns the planted values."""
    rng = np.random.default_rng(0)
    planted = IdleTerm.from_calibration({**TERM, "idle_s": [0.0005, 0.002, 0.005, 0.02, 0.05, 0.2, 0.5],
                                         "decode": [1e-4, 1e-4, 1.2e-4, 2e-4, 2.2e-4, 2.3e-4, 2.3e-4],
                                         "prompt": [0.5e-4, 0.6e-4, 0.8e-4, 1.5e-4, 1.8e-4, 2e-4, 2e-4]})
    rows = []
    for k in range(12):
        tokens = 0 if k < 6 else 512
        price = 0.002 + 1e-5 * k
        for g in planted.idle_s:
            for r in range(3):
                b2b = price * (1 + 0.002 * rng.standard_normal())
                rows.append({"shape_id": k, "prefill_tokens": tokens, "price_s": price, "idle_s": g, "repeat": r,
                             "gap_s": g, "b2b_s": b2b, "device_s": b2b + planted.extra(g, tokens, price),
                             "pred_b2b_s": price, "pred_idle_s": price})
    term, errors = fit_term(extras(pd.DataFrame(rows)), np.arange(12) % 2 == 0)
    assert term.form == "add" and errors["add"] < errors["none"]
    for kind in ("decode", "prompt"):
        assert np.allclose(term.values[kind], planted.values[kind], atol=2e-5)


def test_a_simulated_run_priced_along_its_own_timeline_is_its_own_device_time():
    """simulator.clock.price_along_run, what the step-pricing tools use on recorded runs, gives
    back every simulated step's device time when the run was simulated with both terms: the
    clock term along the run's timeline (the idle extra inside each step's duration, as the
    executor runs it) and the idle cost by the idle before each step."""
    from simulator.clock import ClockTerm, price_along_run

    class Clocked(Flat):
        def __init__(self):
            super().__init__(IdleTerm.from_calibration(TERM))
            self.clock = ClockTerm(0.05, {"decode": 0.2, "prompt": 0.3},
                                   {"token": 1.4e10, "sampled": 1e9, "pair": 5e5})

        def predict(self, f: dict) -> float:
            return 1e-3 + 2e-6 * f["num_batched_tokens"]

    rng = np.random.default_rng(1)
    requests = [Request(i, float(t), int(rng.integers(16, 900)), int(rng.integers(2, 30)))
                for i, t in enumerate(np.cumsum(rng.exponential(0.02, 60)))]
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=2048)
    cost = Clocked()
    steps = pd.DataFrame(Simulator(sched, CacheConfig(block_size=16, enable_prefix_caching=False), cost,
                                   num_blocks=400).run(requests).steps).sort_values("start_s")
    assert (steps["gpu_gap_s"] > 1e-3).sum() > 5                    # some steps after idle
    base = np.array([cost.predict(r) for r in steps.to_dict("records")])
    _, price = price_along_run(cost.clock, cost.idle, steps, base)
    assert np.allclose(price, steps["device_s"], rtol=1e-6, atol=1e-9)
    assert not np.allclose(price, price_along_run(cost.clock, None, steps, base)[1])   # the term counts
