"""The simulator against the engine, metric by metric: the table a sim-vs-real check reads.

Error is signed and relative to the measurement: (sim - real) / real, in percent; +10 %
means the simulator predicts 10 % more than the engine measured. `identify` tells which of
two runs is the real one from their summaries (mode gpu = real); when both are simulated
(e.g. a cost model against a replay) the first given is the reference.
"""
import math

import pandas as pd

from analysis.runs import Run

METRICS = ("completed", "duration_s", "request_throughput", "output_throughput",
           "total_token_throughput", "request_goodput",
           "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
           "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
           "mean_itl_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms",
           "mean_e2el_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms",
           "peak_output_tok_s", "peak_concurrency", "mean_concurrency",
           "prefix_cache_hit_rate", "num_preemptions")


def percent_error(real, sim) -> float:
    """(sim - real) / |real| x 100; NaN when either is missing, 0 when both are 0, inf
    when only the measurement is 0."""
    if real is None or sim is None or (isinstance(real, float) and math.isnan(real)):
        return math.nan
    if real == 0:
        return 0.0 if sim == 0 else math.inf
    return 100.0 * (sim - real) / abs(real)


def compare_metrics(real: dict, sim: dict, metrics=METRICS) -> pd.DataFrame:
    """Rows: each metric present in either dict; columns metric, real, sim, error_pct."""
    rows = [{"metric": m, "real": real.get(m), "sim": sim.get(m),
             "error_pct": percent_error(real.get(m), sim.get(m))}
            for m in metrics if m in real or m in sim]
    return pd.DataFrame(rows, columns=["metric", "real", "sim", "error_pct"])


def identify(a: Run, b: Run) -> tuple[Run, Run]:
    """(real, sim): the run made on the engine (mode gpu) is the real one, whichever order
    they were given in; otherwise `a` is the reference."""
    if a.summary.get("mode") == "sim" and b.summary.get("mode") == "gpu":
        return b, a
    return a, b


def compare_runs(real: Run, sim: Run) -> pd.DataFrame:
    return compare_metrics(real.metrics, sim.metrics)


def format_table(table: pd.DataFrame) -> str:
    """The comparison as text: values with 4 significant digits, errors as '+12.3%'."""
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{value:.4g}"
    shown = pd.DataFrame({"metric": table["metric"], "real": table["real"].map(cell),
                          "sim": table["sim"].map(cell),
                          "(sim-real)/real": table["error_pct"].map(
                              lambda e: "n/a" if math.isnan(e) else f"{e:+.1f}%")})
    return shown.to_string(index=False)


def split_rule_note(real: Run, sim: Run) -> str | None:
    """One line where the real run's decode attention cut its KV by another split rule (or
    geometry) than the simulated run priced, as each summary records it (`run.decode_plan`:
    the KV heads, the SMs and the rule the kernel runs, experiments.replay), else None (the
    same, or a run that records none: runs before session 24, other attention backends,
    replays)."""
    ran, priced = ((r.summary.get("run") or {}).get("decode_plan") for r in (real, sim))
    if not ran or not priced:
        return None
    diff = [f"{f} {ran.get(f)} ran, {priced.get(f)} priced" for f in {**ran, **priced} if ran.get(f) != priced.get(f)]
    if not diff:
        return None
    return ("note: the decode attention's split rule differs (" + "; ".join(diff) + "): the twin "
            "prices other shares than the engine cut; run the engine with engine.kernel_plan=<the "
            "calibration>, which pins its rule, or calibrate this engine")


def priced_steps(real: Run, sim: Run) -> tuple[pd.DataFrame | None, str]:
    """The real run's steps (those with a device time) priced by the cost model the simulated
    run used, built from its config as the simulator built it (a calibration's clock term
    applied along the real run's own timeline; a feature an older engine did not record
    takes the cost model's fallback, as run_fidelity's steps.csv): (its steps table with
    `pred_s`, the cost model's name), or (None, why not) when the simulated run replayed
    recorded steps or its config or the real steps cannot be priced."""
    try:   # the one place analysis reaches up: the simulator's cost model (torch-free)
        from omegaconf.errors import OmegaConfBaseException

        from experiments.config import build, recorded_config
        from experiments.replay import sim_cost_model
        from simulator.clock import price_along_run
    except ImportError as e:
        return None, f"the simulator cannot be imported here ({e})"
    cost = sim.config.get("cost_model") or {}
    if cost.get("kind") not in ("fitted", "roofline"):
        return None, f"the simulated run's cost model is {cost.get('kind')!r}, not fitted or roofline"
    steps = real.steps()
    if "device_s" not in steps:
        return None, "the real run's steps have no device times"
    steps = steps[steps["device_s"].notna() & (steps["num_seqs"] > 0)].sort_values("start_s")
    try:
        _, model = sim_cost_model(build(recorded_config(sim.config)))
        pred = [model.predict(row) for row in steps.to_dict("records")]
        # a run recorded without gpu_gap_s, where a term needs it: ValueError, said below
        pred = price_along_run(model.clock, model.idle, steps, pred)[1]
    except (KeyError, TypeError, ValueError, FileNotFoundError, OmegaConfBaseException) as e:
        return None, f"the simulated run's cost model cannot price the real steps ({type(e).__name__}: {e})"
    return steps.assign(pred_s=pred), cost["kind"] + (f" ({cost['path']})" if cost.get("path") else "")


STEP_KINDS = ("decode-only steps", "steps with prefill")   # step_price_errors' rows


def step_price_errors(priced: pd.DataFrame) -> pd.DataFrame:
    """Per step kind (decode-only, with prefill): steps, the mean of (price - measured) /
    measured and the time-weighted error (sum of prices / sum of device times - 1), in %."""
    rows = []
    for kind, part in ((STEP_KINDS[0], priced[priced["num_prefill_tokens"] == 0]),
                       (STEP_KINDS[1], priced[priced["num_prefill_tokens"] > 0])):
        if len(part):
            err = part["pred_s"] / part["device_s"] - 1
            rows.append({"kind": kind, "n": len(part), "mean_error_pct": 100 * err.mean(),
                         "weighted_error_pct": 100 * (part["pred_s"].sum() / part["device_s"].sum() - 1)})
    return pd.DataFrame(rows)

