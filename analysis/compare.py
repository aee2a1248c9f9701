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
