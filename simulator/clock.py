"""The GPU clock's state: a step costs more right after compute-heavy work.

Under sustained compute an H200 holds its power limit by lowering its SM clock, within a
step or two, and raises it again within tens of milliseconds of lighter work
(benchmarks/README.md, sessions 12-15: on Llama-3.1-8B a 2,048-token prompt step runs 6-14%
slower back to back than after a run of decodes, and a decode right after two such steps
8% slower than after decodes). A twin that prices every step at one clock is fast after a
burst of prompts and slow on a prompt that follows decodes, by more than its targets.

The model, one rule that the fit (simulator.calibrate.fit_clock, on the profile's launch
timeline) and the simulator (SimExecutor, through FittedCostModel.clock) both use:
- a step's compute rate u is its FLOPs (`ClockTerm.step_flops`, on one rank) over its device
  time, in PFLOP/s;
- the heat h follows u through a first-order lag of time constant `tau_s` while a step runs,
  and decays toward 0 while the device is idle;
- a step whose base (cool-clock) time is T runs T x (1 + slowdown[kind] x its mean heat),
  kind "prompt" for a step with prompt tokens, else "decode" (a memory-bound decode slows
  less than a compute-bound prompt step under the same clock).
No torch: the simulator imports it.
"""
import math
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

PFLOPS = 1e15    # heat is in PFLOP/s of compute


def step_kind(num_prefill_tokens) -> str:
    return "prompt" if num_prefill_tokens > 0 else "decode"


def step_kinds(num_prefill_tokens) -> np.ndarray:
    """`step_kind` of many steps (their num_prefill_tokens, an array or a column)."""
    return np.where(np.asarray(num_prefill_tokens) > 0, step_kind(1), step_kind(0))


def slowdowns(slowdown: dict, num_prefill_tokens) -> np.ndarray:
    """Each step's slowdown per PFLOP/s of heat, by its kind (0 for a kind `slowdown` lacks)."""
    return np.array([slowdown.get(kind, 0.0) for kind in step_kinds(num_prefill_tokens)], float)


def flops_per_unit(model, tp: int = 1) -> dict:
    """FLOPs of one rank per computed token (the linear layers), per sampled token (the LM
    head) and per attention (query, key) pair (QK and PV over all layers), from a ModelSpec."""
    c = model.config
    return {"token": 2.0 * model.matmul_params / tp, "sampled": 2.0 * model.lm_head_params / tp,
            "pair": 4.0 * model.num_layers * c.num_attention_heads * c.head_dim / tp}


def mean_heat(h0, u, duration, tau):
    """Mean heat over a step of `duration` at rate u, starting at h0 (first-order lag)."""
    x = duration / tau
    return u + (h0 - u) * (-np.expm1(-x) / x if np.ndim(x) else -math.expm1(-x) / x)


def end_heat(h0, u, duration, tau):
    return u + (h0 - u) * np.exp(-duration / tau)


@dataclass(frozen=True)
class ClockTerm:
    """The fitted constants (a calibration's "clock" section, `describe()`)."""
    tau_s: float
    slowdown: dict          # "decode" / "prompt" -> relative slowdown per PFLOP/s of heat
    flops: dict             # flops_per_unit

    @classmethod
    def from_calibration(cls, d: dict | None, source: str = "<calibration>") -> "ClockTerm | None":
        if not d:
            return None
        try:
            term = cls(float(d["tau_s"]), {k: float(v) for k, v in d["slowdown"].items()},
                       {k: float(d["flops"][k]) for k in ("token", "sampled", "pair")})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: the clock section needs tau_s, slowdown and flops "
                             f"(token, sampled, pair): {e!r}") from None
        if term.tau_s <= 0 or any(v < 0 for v in term.slowdown.values()):
            raise ValueError(f"{source}: the clock section needs tau_s > 0 and slowdowns >= 0")
        return term

    def describe(self) -> dict:
        return {"tau_s": self.tau_s, "slowdown": dict(self.slowdown), "flops": dict(self.flops)}

    def step_flops(self, f) -> float:
        """FLOPs of one rank for a step's features (a dict or a DataFrame's columns)."""
        pairs = f["prefill_attention_pairs"] + f["decode_context_tokens"]
        return (self.flops["token"] * f["num_batched_tokens"] + self.flops["sampled"] * f["num_sampled"]
                + self.flops["pair"] * pairs)


class Clock:
    """One device's clock state through a run (each simulated replica's executor holds one)."""

    def __init__(self, term: ClockTerm):
        self.term, self.heat, self.t = term, 0.0, 0.0

    def run(self, start: float, base_s: float, features: dict, extra_s: float = 0.0) -> float:
        """Device seconds of a step of base time `base_s` (plus `extra_s` the clock does not
        stretch: an IdleTerm's) that starts at `start` (no earlier than the last step's end);
        the state moves to its end."""
        term = self.term
        h0 = self.heat * math.exp(-max(0.0, start - self.t) / term.tau_s)
        if base_s <= 0:
            self.heat, self.t = h0, start
            return base_s + extra_s
        flops = term.step_flops(features)
        slow = term.slowdown.get(step_kind(features["num_prefill_tokens"]), 0.0)
        duration = base_s + extra_s
        for _ in range(3):      # u is the step's FLOPs over the time it actually takes, as
            u = flops / (duration * PFLOPS)     # heat_along reads a measured timeline
            duration = base_s * (1.0 + slow * mean_heat(h0, u, duration, term.tau_s)) + extra_s
        self.heat, self.t = end_heat(h0, u, duration, term.tau_s), start + duration
        return duration


def heat_along(flops: np.ndarray, device_s: np.ndarray, gap_s: np.ndarray, tau: float) -> np.ndarray:
    """Mean heat of each step of a device timeline: steps in order, each with its FLOPs, its
    device time and the device idle before it (measured, as the profile's Timeline records)."""
    u = flops / (device_s * PFLOPS)
    out = np.empty(len(u))
    h = 0.0
    for i in range(len(u)):
        h *= math.exp(-gap_s[i] / tau)
        x = device_s[i] / tau
        out[i] = u[i] + (h - u[i]) * (-math.expm1(-x) / x)
        h = u[i] + (h - u[i]) * math.exp(-x)
    return out


def along_run(term: ClockTerm, steps, base_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(heat, price) of a recorded run's steps (a steps table in start order: the features,
    device_s and gpu_gap_s) whose base prices are `base_s`, under the term along the run's own
    measured device timeline, as the fit reads the profile's. ValueError for steps without
    gpu_gap_s (a run recorded before it was)."""
    if "gpu_gap_s" not in steps.columns:
        raise ValueError("the run's steps have no gpu_gap_s (the device idle before each step), which "
                         "a clock term needs: record the run again")
    heat = heat_along(np.asarray(term.step_flops(steps), float), steps["device_s"].to_numpy(float),
                      steps["gpu_gap_s"].fillna(0.0).to_numpy(float), term.tau_s)
    return heat, np.asarray(base_s, float) * (1 + slowdowns(term.slowdown, steps["num_prefill_tokens"]) * heat)


def price_along_run(clock: ClockTerm | None, idle: "IdleTerm | None", steps, base_s) -> tuple:
    """(heat or None, price) of a recorded run's steps (a steps table in start order) whose
    base prices are `base_s`, as the simulator prices its own steps: under the clock term along
    the run's measured device timeline (`along_run`), plus the idle cost by the device idle
    before each step (`IdleTerm.extra`, the first step after the idle since start-up). The
    one rule every tool that prices real steps with a calibration follows (step errors,
    step_residuals, analysis --compare). ValueError for a run without gpu_gap_s."""
    heat, price = (None, np.asarray(base_s, float)) if clock is None else along_run(clock, steps, base_s)
    if idle is not None:
        if "gpu_gap_s" not in steps.columns:
            raise ValueError("the run's steps have no gpu_gap_s (the device idle before each step), which "
                             "an idle cost needs: record the run again")
        gaps = steps["gpu_gap_s"].fillna(0.0).to_numpy(float).copy()
        if len(gaps):
            gaps[0] = math.inf
        price = price + np.array([idle.extra(g, n, b) for g, n, b in zip(
            gaps, steps["num_prefill_tokens"].to_numpy(), np.asarray(base_s, float))])
    return heat, price


IDLE_FORMS = ("add", "mul")


@dataclass(frozen=True)
class IdleTerm:
    """What a step costs beyond its price (and the clock term's) after the device sat idle
    `gap` seconds: a calibration's "idle_cost" (experiments.idle_cost measures it). A device
    left idle drops its SM clock toward idle speed and lets caches go cold, so the first step
    after a pause runs long; the heat of the clock term decays in the same pause, which the
    measurement already set against. Per step kind (`step_kind`), one value per measured idle
    length `idle_s` (ascending): seconds ("add") or a share of the step's price ("mul"),
    interpolated in log idle, scaled down linearly below the shortest idle (0 at no idle) and
    held past the longest."""
    form: str
    idle_s: tuple
    values: dict            # "decode" / "prompt" -> one value per idle length

    @classmethod
    def from_calibration(cls, d: dict | None, source: str = "<calibration>") -> "IdleTerm | None":
        if not d:
            return None
        try:
            idle = tuple(float(g) for g in d["idle_s"])
            term = cls(str(d["form"]), idle, {k: tuple(float(v) for v in d[k])
                                              for k in ("decode", "prompt") if k in d})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: the idle_cost section needs form, idle_s and per-kind "
                             f"values: {e!r}") from None
        if (term.form not in IDLE_FORMS or not idle or any(g <= 0 for g in idle)
                or list(idle) != sorted(set(idle))
                or any(len(v) != len(idle) or not all(map(math.isfinite, v)) for v in term.values.values())):
            raise ValueError(f"{source}: idle_cost needs form in {IDLE_FORMS}, idle_s ascending "
                             "and > 0, and one finite value per idle length for each kind")
        return term

    def describe(self) -> dict:
        return {"form": self.form, "idle_s": list(self.idle_s), **{k: list(v) for k, v in self.values.items()}}

    def extra(self, gap_s: float, num_prefill_tokens: int, price_s: float) -> float:
        """Seconds to add to a step of price `price_s` launched after `gap_s` of device idle."""
        values = self.values.get(step_kind(num_prefill_tokens))
        if not values or not gap_s > 0:
            return 0.0
        g = self.idle_s
        if gap_s <= g[0]:
            v = values[0] * gap_s / g[0]
        elif gap_s >= g[-1]:
            v = values[-1]
        else:   # (per simulated step: plain floats, no numpy)
            i = bisect_right(g, gap_s)
            w = math.log(gap_s / g[i - 1]) / math.log(g[i] / g[i - 1])
            v = values[i - 1] + w * (values[i] - values[i - 1])
        return v * price_s if self.form == "mul" else v

