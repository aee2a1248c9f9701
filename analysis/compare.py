"""Run A against run B, metric by metric: the table a sim-vs-real check reads.

Relative error is (B - A) / |A|: with A the reference (the engine) and B the prediction (the
simulator), +0.10 means the simulator says 10 % more.
"""
import math

import pandas as pd

from analysis.runs import Run

METRICS = ("completed", "duration_s", "request_throughput", "output_throughput",
           "total_token_throughput", "request_goodput",
           "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
           "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
           "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
           "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
           "peak_output_tok_s", "peak_concurrency", "mean_concurrency",
           "prefix_cache_hit_rate", "num_preemptions")


def relative_error(a, b) -> float:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return math.nan
    if a == 0:
        return 0.0 if b == 0 else math.inf
    return (b - a) / abs(a)


def compare_metrics(a: dict, b: dict, metrics=METRICS) -> pd.DataFrame:
    """Rows: each metric present in either dict; columns metric, A, B, rel_err."""
    rows = [{"metric": m, "A": a.get(m), "B": b.get(m),
             "rel_err": relative_error(a.get(m), b.get(m))} for m in metrics if m in a or m in b]
    return pd.DataFrame(rows, columns=["metric", "A", "B", "rel_err"])


def compare_runs(a: Run, b: Run) -> pd.DataFrame:
    return compare_metrics(a.metrics, b.metrics)
