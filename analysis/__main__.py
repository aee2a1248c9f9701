"""Tables and figures from result directories.

    python -m analysis outputs/2026-11-23/18-00-00              # one run: report + figures
    python -m analysis multirun/2026-11-23/18-00-00            # a sweep: table, heatmaps...
    python -m analysis --compare runs/gpu runs/sim             # A vs B, metric by metric
    python -m analysis DIR... --out figures/                    # where the PNGs go

With several runs it prints one row per run (the config keys that differ, then headline
metrics); with exactly two varying keys it draws heatmaps; with a varying
`trace.request_rate` it draws latency vs load and, when the runs had SLOs, prints the
capacity (the highest rate at which >= 90 % of requests met them).
"""
import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.compare import compare_runs
from analysis.metrics import format_report
from analysis.runs import HEADLINE, capacity, find_runs, load_run, sweep_table, varying_keys

HEATMAP_METRICS = ("p99_ttft_ms", "p99_tpot_ms", "output_throughput")
RATE_KEY = "trace.request_rate"


def label(run, keys) -> str:
    config = run.config
    parts = []
    for key in keys:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        parts.append(f"{key.split('.')[-1]}={value}")
    return ", ".join(parts) or run.name


def report_one(run, out: Path) -> None:
    print(f"run {run.path} (mode={run.summary.get('mode')}, gpu={run.summary.get('gpu')})")
    print(format_report(run.metrics))
    print("wrote", plots.save(plots.latency_cdfs({run.name: run.requests()}), out / "cdf.png"))
    print("wrote", plots.save(plots.timeline(run.steps()), out / "timeline.png"))


def report_sweep(runs, out: Path) -> None:
    keys = varying_keys(runs)
    slo_metrics = tuple(m for m in ("request_goodput", "slo_attainment")
                        if any(m in r.metrics for r in runs))
    table = sweep_table(runs, HEADLINE + slo_metrics)
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(table.drop(columns="run").to_string(index=False))
    table.to_csv(out / "sweep.csv", index=False)
    if len(runs) <= 12:
        cdfs = plots.latency_cdfs({label(r, keys): r.requests() for r in runs})
        print("wrote", plots.save(cdfs, out / "cdfs.png"))
    if len(keys) == 2:
        for metric in HEATMAP_METRICS:
            fig = plots.heatmap(table, x=keys[0], y=keys[1], metric=metric)
            print("wrote", plots.save(fig, out / f"heatmap_{metric}.png"))
    if RATE_KEY in keys:
        fig = plots.latency_vs_load(table, RATE_KEY)
        print("wrote", plots.save(fig, out / "latency_vs_load.png"))
        if "slo_attainment" in slo_metrics:
            print(f"capacity: {capacity(table, RATE_KEY):g} req/s "
                  "(highest rate with >= 90% of requests within SLO)")


def report_compare(a, b, out: Path) -> None:
    print(f"A = {a.path}\nB = {b.path}")
    with pd.option_context("display.float_format", "{:.4g}".format):
        print(compare_runs(a, b).to_string(index=False))
    cdfs = plots.latency_cdfs({f"A ({a.summary.get('mode')})": a.requests(),
                               f"B ({b.summary.get('mode')})": b.requests()})
    print("wrote", plots.save(cdfs, out / "compare_cdfs.png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", help="run directories or folders of runs")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two run directories")
    parser.add_argument("--out", help="folder for the PNGs (default: <first path>/analysis)")
    args = parser.parse_args(argv)
    if not args.paths and not args.compare:
        parser.error("give run or sweep directories, or --compare A B")
    first = Path(args.paths[0] if args.paths else args.compare[0])
    out = Path(args.out) if args.out else first / "analysis"
    try:
        runs = find_runs(*args.paths) if args.paths else []
        pair = [load_run(p) for p in args.compare] if args.compare else []
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    if len(runs) == 1:
        report_one(runs[0], out)
    elif runs:
        report_sweep(runs, out)
    if pair:
        report_compare(*pair, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
