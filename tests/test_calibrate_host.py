"""The host window of the engine's own step loop (forming a step to its launch), measured at
calibration on a short run of synthetic requests: which turn admitted which requests, and
the fit of its terms."""
import numpy as np
import pandas as pd
import pytest

from experiments.calibrate import SERVING_BURSTS, SERVING_OUTPUT, SERVING_REQUESTS, serving_host
from simulator.calibrate import SERVING_HOST_TERMS, fit_serving_host


def serving_steps(truth: dict, n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Step records of a serving-host run whose windows follow `truth` exactly: admissions
    (0-3 a turn) drawn apart from the prompt chunks, the add_request time timed apart."""
    rng = np.random.default_rng(seed)
    steps = pd.DataFrame({"num_seqs": rng.integers(1, 40, n), "admitted": rng.integers(0, 4, n),
                          "num_prefill_tokens": rng.integers(1, 3000, n) * (rng.random(n) < 0.3),
                          "start_s": rng.random(n)})
    steps["admitted_tokens"] = steps["admitted"] * rng.integers(10, 2000, n)
    steps["admit_time_s"] = truth["admit_s"] * steps["admitted"] + truth["admit_token_s"] * steps["admitted_tokens"]
    steps["launch_s"] = steps["start_s"] + steps["admit_time_s"] + (
        truth["launch_s"] + truth["launch_prompt_s"] * (steps["num_prefill_tokens"] > 0)
        + truth["launch_seq_s"] * steps["num_seqs"] + truth["launch_token_s"] * steps["num_prefill_tokens"])
    return steps


TRUTH = dict(zip(SERVING_HOST_TERMS, (4.3e-4, 2.2e-6, 1.3e-7, 3.0e-4, 1.0e-4, 1.5e-7)))


def test_the_fit_recovers_the_window_s_terms():
    steps = serving_steps(TRUTH)
    fit = fit_serving_host(pd.concat([steps, steps.head(3).assign(num_seqs=0)]))   # a step that only preempted: left out
    assert fit["n"] == len(steps)
    for name, value in TRUTH.items():
        assert fit[name] == pytest.approx(value, rel=1e-6)


def test_admissions_that_always_come_with_a_prompt_step_still_split_from_it():
    """At light load every admission comes with the prompt step that runs it (the two were
    collinear in the window): timed apart, each term is still recovered."""
    steps = serving_steps(TRUTH, seed=1)
    steps = steps[(steps["admitted"] > 0) == (steps["num_prefill_tokens"] > 0)]
    fit = fit_serving_host(steps)
    assert fit["admit_s"] == pytest.approx(TRUTH["admit_s"], rel=1e-6)
    assert fit["launch_prompt_s"] == pytest.approx(TRUTH["launch_prompt_s"], rel=1e-6)


def test_a_host_pause_does_not_move_the_fit():
    steps = serving_steps(TRUTH, seed=2)
    steps.loc[steps.index[7], "launch_s"] += 0.12        # one collector run of 120 ms
    fit = fit_serving_host(steps)
    assert fit["n"] == len(steps) - 1
    assert fit["launch_s"] == pytest.approx(TRUTH["launch_s"], rel=1e-6)


def test_a_run_without_timed_admissions_is_refused():
    steps = serving_steps(TRUTH)
    with pytest.raises(ValueError, match="admit_time_s"):
        fit_serving_host(steps.drop(columns="admit_time_s"))
    with pytest.raises(ValueError, match="admit no request"):
        fit_serving_host(steps.assign(admitted=0))


class FakeEngine:
    """Just enough of LLMEngine: each step runs the decodes, then prompt chunks within a
    1,024-token budget (waiting requests join while fewer than 4 run) and records a step;
    every request decodes SERVING_OUTPUT tokens."""
    BUDGET = 1024

    class Loop:
        last_record = None

    class Config:
        vocab_size = 1000

    def __init__(self):
        self.step_records, self.loop, self.model_config = [], self.Loop(), self.Config()
        self.waiting, self.running, self.t = [], [], 0.0     # running: [prompt left, tokens left]

    def clock(self):
        self.t += 1e-3
        return self.t

    def add_request(self, prompt, params):
        assert params.max_tokens == SERVING_OUTPUT and params.ignore_eos
        self.waiting.append(len(prompt))

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def step(self, now):
        while self.waiting and len(self.running) < 4:
            self.running.append([self.waiting.pop(0), SERVING_OUTPUT])
        budget, prompt = self.BUDGET, 0
        for seq in self.running:
            if seq[0] == 0:
                seq[1] -= 1
                budget -= 1
        for seq in self.running:
            chunk = min(seq[0], budget)
            seq[0] -= chunk
            budget -= chunk
            prompt += chunk
        record = {"start_s": now, "launch_s": now + 1e-4, "num_seqs": len(self.running),
                  "num_prefill_tokens": prompt}
        self.step_records.append(record)
        self.loop.last_record = record
        self.running = [seq for seq in self.running if seq[1] > 0]


def test_a_short_serving_run_admits_bursts_apart_from_its_prompt_steps():
    engine = FakeEngine()
    steps = serving_host(engine, max_prompt=2000)
    assert steps["admitted"].sum() == SERVING_REQUESTS and not engine.has_unfinished()
    assert steps["admitted"].tolist()[:len(SERVING_BURSTS)] == list(SERVING_BURSTS)
    assert set(steps["admitted"]) == {0, 1, 2, 3}
    prompt = steps["num_prefill_tokens"] > 0
    assert (prompt & (steps["admitted"] == 0)).any() and (~prompt & (steps["admitted"] > 0)).any()
    assert steps["admitted_tokens"].sum() == steps["num_prefill_tokens"].sum()
    assert 16 <= steps.loc[steps["admitted"] > 0, "admitted_tokens"].min() and steps["admitted_tokens"].max() <= 3 * 2000
    assert ((steps["admit_time_s"] > 0) == (steps["admitted"] > 0)).all()
    assert (steps["launch_s"] > steps["start_s"]).all()
