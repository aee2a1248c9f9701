"""The host window of the engine's own step loop (forming a step to its launch), measured at
calibration on a short run of synthetic requests: which turn admitted which requests, and
the fit of its terms."""
import numpy as np
import pandas as pd
import pytest

from experiments.calibrate import SERVING_EVERY, SERVING_OUTPUT, SERVING_REQUESTS, serving_host
from simulator.calibrate import SERVING_HOST_TERMS, fit_serving_host


def test_the_fit_recovers_the_window_s_terms():
    rng = np.random.default_rng(0)
    n = 400
    steps = pd.DataFrame({"num_seqs": rng.integers(1, 40, n), "num_prefill_tokens": rng.integers(0, 3000, n) * (rng.random(n) < 0.3),
                          "admitted": rng.integers(0, 3, n), "start_s": rng.random(n)})
    steps["admitted_tokens"] = steps["admitted"] * rng.integers(10, 2000, n)
    truth = dict(zip(SERVING_HOST_TERMS, (4.3e-4, 3.0e-4, 2.2e-6, 1.3e-7, 1.0e-4, 1.5e-7)))
    steps["launch_s"] = steps["start_s"] + (truth["launch_s"] + truth["launch_prompt_s"] * (steps["num_prefill_tokens"] > 0)
                                            + truth["launch_seq_s"] * steps["num_seqs"]
                                            + truth["launch_token_s"] * steps["num_prefill_tokens"]
                                            + truth["admit_s"] * steps["admitted"] + truth["admit_token_s"] * steps["admitted_tokens"])
    fit = fit_serving_host(pd.concat([steps, steps.head(3).assign(num_seqs=0)]))   # a step that only preempted: left out
    assert fit["n"] == n
    for name, value in truth.items():
        assert fit[name] == pytest.approx(value, rel=1e-6)


class FakeEngine:
    """Just enough of LLMEngine: each step schedules the waiting requests and records a step
    (at most 4 running; every request decodes SERVING_OUTPUT tokens)."""

    class Loop:
        last_record = None

    class Config:
        vocab_size = 1000

    def __init__(self):
        self.step_records, self.loop, self.model_config = [], self.Loop(), self.Config()
        self.waiting, self.running, self.t = [], {}, 0.0

    def clock(self):
        self.t += 1e-3
        return self.t

    def add_request(self, prompt, params):
        assert params.max_tokens == SERVING_OUTPUT and params.ignore_eos
        self.waiting.append(len(prompt))

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def step(self, now):
        admitted = self.waiting[:max(0, 4 - len(self.running))]
        self.waiting = self.waiting[len(admitted):]
        for n in admitted:
            self.running[len(self.step_records), n] = SERVING_OUTPUT
        record = {"start_s": now, "launch_s": now + 1e-4, "num_seqs": len(self.running),
                  "num_prefill_tokens": sum(admitted)}
        self.step_records.append(record)
        self.loop.last_record = record
        self.running = {k: v - 1 for k, v in self.running.items() if v > 1}


def test_a_short_serving_run_admits_a_request_every_few_turns():
    engine = FakeEngine()
    steps = serving_host(engine, max_prompt=2000)
    assert steps["admitted"].sum() == SERVING_REQUESTS and not engine.has_unfinished()
    assert steps["admitted"].max() == 1
    admitting = np.flatnonzero(steps["admitted"].to_numpy())
    assert (np.diff(admitting) == SERVING_EVERY).all()       # one every SERVING_EVERY turns
    assert steps["admitted_tokens"].min() == 0 and 16 <= steps.loc[steps["admitted"] > 0, "admitted_tokens"].min()
    assert steps["admitted_tokens"].max() <= 2000 and steps["admitted_tokens"].sum() == steps["num_prefill_tokens"].sum()
    assert (steps["launch_s"] > steps["start_s"]).all()
