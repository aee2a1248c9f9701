"""The clock term (simulator/clock.py): the state a step leaves behind, the fit that recovers a
planted term from a profile's launch timeline, and the simulator pricing steps with it."""
import math

import numpy as np
import pandas as pd
import pytest

from simulator.calibrate import CLOCK_TAUS, fit_clock
from simulator.clock import PFLOPS, Clock, ClockTerm, end_heat, heat_along, mean_heat

FLOPS = {"token": 1.4e10, "sampled": 1e9, "pair": 5e5}
TERM = ClockTerm(0.05, {"decode": 0.2, "prompt": 0.25}, FLOPS)
DECODE = {"num_batched_tokens": 8, "num_prefill_tokens": 0, "num_sampled": 8,
          "prefill_attention_pairs": 0, "decode_context_tokens": 8 * 1024}
PROMPT = {"num_batched_tokens": 2056, "num_prefill_tokens": 2048, "num_sampled": 9,
          "prefill_attention_pairs": 2048 * 2049 // 2, "decode_context_tokens": 8 * 1024}


def test_mean_heat_is_the_lag_averaged_over_the_step():
    h0, u, T, tau = 0.1, 0.6, 0.04, 0.05
    t = np.linspace(0, T, 100_001)
    numeric = np.mean(u + (h0 - u) * np.exp(-t / tau))
    assert mean_heat(h0, u, T, tau) == pytest.approx(numeric, rel=1e-4)
    assert end_heat(h0, u, T, tau) == pytest.approx(u + (h0 - u) * math.exp(-T / tau))


def test_a_decode_costs_more_right_after_prompt_steps_than_after_idle():
    base_decode, base_prompt = 0.006, 0.05
    hot = Clock(TERM)
    t = 0.0
    for _ in range(3):
        t += hot.run(t, base_prompt, PROMPT)
    after_prompts = hot.run(t, base_decode, DECODE)
    cooled = Clock(TERM)
    cooled.run(0.0, base_prompt, PROMPT)
    after_idle = cooled.run(10.0, base_decode, DECODE)       # 200 time constants later
    assert after_prompts > after_idle * 1.05
    assert after_idle == pytest.approx(base_decode * (1 + 0.2 * mean_heat(0.0, DECODE_U(base_decode), base_decode, 0.05)))
    # back-to-back prompt steps slow down towards the steady state, 1 + slowdown x u
    steady = 1 + 0.25 * TERM.step_flops(PROMPT) / (base_prompt * PFLOPS)
    times = []
    clock, t = Clock(TERM), 0.0
    for _ in range(40):
        times.append(clock.run(t, base_prompt, PROMPT))
        t += times[-1]
    assert times[0] < times[1] < times[5] <= times[-1] * 1.001
    assert times[-1] / base_prompt == pytest.approx(steady, rel=0.02)


def DECODE_U(base):
    return TERM.step_flops(DECODE) / (base * PFLOPS)


def test_no_slowdown_prices_the_base_time():
    clock = Clock(ClockTerm(0.05, {"decode": 0.0, "prompt": 0.0}, FLOPS))
    assert clock.run(0.0, 0.05, PROMPT) == 0.05 and clock.run(0.05, 0.006, DECODE) == 0.006


def planted_timeline(term: ClockTerm, shapes: int, seed: int = 0):
    """A profile and its launch timeline as experiments.calibrate records them, every device
    time made by `term` from a base time per shape (1% noise): per shape a warm-up, an idle
    launch and 3 back to back; every 2nd prompt shape also after 4 light decodes (cool),
    every 2nd decode shape also after 2 heavy prompt steps (hot)."""
    rng = np.random.default_rng(seed)
    clock, t, rows, profile = Clock(term), 0.0, [], []
    light = dict(DECODE, num_batched_tokens=4, num_sampled=4, decode_context_tokens=4 * 512)

    def launch(k, phase, own, f, base, gap=1e-6):
        nonlocal t
        t += gap
        d = clock.run(t, base, f) * (1 + 0.01 * rng.standard_normal())
        clock.t = t + d
        t += d
        rows.append({"shape": k, "phase": phase, "own": own, **f, "gap_s": gap, "device_s": d})
        return d
    for k in range(shapes):
        prompt = k % 2 == 1
        tokens = int(rng.integers(256, 4096)) if prompt else 0
        f = dict(PROMPT, num_batched_tokens=tokens + 8, num_prefill_tokens=tokens,
                 prefill_attention_pairs=tokens * (tokens + 1) // 2) if prompt else dict(
            DECODE, num_batched_tokens=int(rng.integers(1, 64)), num_sampled=0)
        if not prompt:
            f["num_sampled"] = f["num_batched_tokens"]
            f["decode_context_tokens"] = 1024 * f["num_batched_tokens"]
        base = 0.002 + 2.5e-5 * f["num_batched_tokens"] + 4e-8 * f["prefill_attention_pairs"]
        b2b = [launch(k, "back_to_back", True, f, base, gap=3e-3 if i == 0 else 1e-6) for i in range(5)][2:]
        if prompt and k % 4 == 1:
            for _ in range(4):
                launch(k, "cool", False, light, 0.005)
            launch(k, "cool", True, f, base)
        if not prompt and k % 4 == 0:
            for _ in range(2):
                launch(k, "hot", False, PROMPT, 0.05)
            launch(k, "hot", True, f, base)
        profile.append({**f, "device_s": float(np.median(b2b)), "split": "held_out" if k % 5 == 4 else "train",
                        "base_s": base})
    return pd.DataFrame(profile), pd.DataFrame(rows)


def test_the_fit_recovers_a_planted_clock_term():
    planted = ClockTerm(0.05, {"decode": 0.15, "prompt": 0.3}, FLOPS)
    assert planted.tau_s in CLOCK_TAUS
    profile, timeline = planted_timeline(planted, 400)
    clock, heat = fit_clock(profile, timeline, FLOPS)
    assert clock is not None and clock["tau_s"] == planted.tau_s
    assert clock["slowdown"]["prompt"] == pytest.approx(0.3, rel=0.2)
    assert clock["slowdown"]["decode"] == pytest.approx(0.15, rel=0.25)
    assert clock["held_out"]["mape"] < clock["held_out"]["mape_without"]
    # the back-to-back times over 1 + slowdown x heat: the base times, within the noise
    slow = np.where(profile["num_prefill_tokens"] > 0, 0.3, 0.15)
    base = profile["device_s"] / (1 + slow * heat)
    assert np.abs(base / profile["base_s"] - 1).max() < 0.03
    assert np.abs(profile["device_s"] / profile["base_s"] - 1).max() > 0.05    # (the clock mattered)


def test_a_timeline_without_a_clock_gets_no_term():
    flat = ClockTerm(0.05, {"decode": 0.0, "prompt": 0.0}, FLOPS)
    for seed in range(4):
        profile, timeline = planted_timeline(flat, 200, seed=seed)
        clock, _ = fit_clock(profile, timeline, FLOPS)
        assert clock is None


def test_heat_along_a_timeline_matches_the_clock():
    clock, t, f = Clock(TERM), 0.0, []
    steps = [(PROMPT, 0.05, 0.0), (DECODE, 0.006, 0.0), (DECODE, 0.006, 0.02), (PROMPT, 0.04, 0.001)]
    heats, device, gaps = [], [], []
    for feats, base, gap in steps:
        t += gap
        h0 = clock.heat * math.exp(-(t - clock.t) / TERM.tau_s)
        d = clock.run(t, base, feats)
        heats.append(mean_heat(h0, TERM.step_flops(feats) / (d * PFLOPS), d, TERM.tau_s))
        device.append(d)
        gaps.append(gap)
        t += d
    flops = np.array([TERM.step_flops(x) for x, _, _ in steps])
    assert heat_along(flops, np.array(device), np.array(gaps), TERM.tau_s) == pytest.approx(heats, rel=2e-3)


def test_a_bad_clock_section_is_refused():
    with pytest.raises(ValueError, match="clock section"):
        ClockTerm.from_calibration({"tau_s": 0.05}, "x.json")
    with pytest.raises(ValueError, match="tau_s > 0"):
        ClockTerm.from_calibration({"tau_s": 0, "slowdown": {"decode": 0.1}, "flops": FLOPS}, "x.json")
    assert ClockTerm.from_calibration(None) is None
