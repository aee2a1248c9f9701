"""Tables and figures from result directories.

    python -m analysis outputs/2026-11-23/18-00-00           # one run: report + figures
    python -m analysis multirun/2026-11-23/18-00-00         # a sweep: table, heatmaps...
    python -m analysis --compare REAL SIM                   # the simulator against the engine
    python -m analysis DIR... --out figures/                 # where the PNGs go

With several runs it prints one row per run (the config keys that differ, then headline
metrics); with exactly two varying keys it draws heatmaps; with a varying
`trace.request_rate` it draws latency vs load with the SLOs and, when the runs had SLOs,
prints and marks the capacity (the highest rate at which >= 90 % of requests met them).

--compare takes a real run (mode=gpu) and a simulated one, in either order (the summaries
say which is which), and reports every metric with its error (sim - real) / real as a
signed percentage, overlaid latency CDFs and predicted-vs-measured step times (each real
step priced by the simulator's cost model, where the simulated run used one). Given two
load sweeps instead, it pairs their runs by request rate and draws latency vs load for both.
"""
import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.compare import (compare_runs, format_table, identify, percent_error, priced_steps,
                              split_rule_note, step_price_errors)
from analysis.metrics import format_report, format_value
from analysis.runs import HEADLINE, capacity, find_runs, sweep_table, varying_keys

HEATMAP_METRICS = ("p99_ttft_ms", "p99_tpot_ms", "output_throughput")
RATE_KEY = "trace.request_rate"
MAX_OVERLAID = 40          # runs drawn in one CDF figure
LOAD_METRICS = ("request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
                "p99_tpot_ms", "mean_e2el_ms")


def label(run, keys) -> str:
    config = run.config
    parts = []
    for key in keys:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        parts.append(f"{key.split('.')[-1]}={value}")
    text = ", ".join(parts) or run.name
    return text if len(text) <= 60 else text[:57] + "..."


def describe(run) -> str:
    s = run.summary
    return s.get("backend") or f"mode={s.get('mode')}, gpu={s.get('gpu')}"


def slos_of(runs) -> dict:
    """The SLOs the runs were made with (the first run's; a sweep shares them)."""
    slo = runs[0].config.get("slo") or {}
    return {k: v for k, v in slo.items() if v is not None}


def report_one(run, out: Path) -> None:
    print(f"run {run.path}\n{describe(run)}")
    if run.summary.get("load"):
        print(f"load: {run.summary['load'].get('text')}")
    print(format_report(run.metrics))
    print("wrote", plots.save(plots.latency_cdfs({run.name: run.requests()}), out / "cdf.png"))
    print("wrote", plots.save(plots.timeline(run.steps()), out / "timeline.png"))


def report_sweep(runs, out: Path) -> None:
    keys = varying_keys(runs)
    slo_metrics = tuple(m for m in ("request_goodput", "slo_attainment")
                        if any(m in r.metrics for r in runs))
    table = sweep_table(runs, HEADLINE + slo_metrics)
    shown = table.drop(columns="run").map(lambda v: format_value(v) if isinstance(v, float)
                                          else v)
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(shown.to_string(index=False))
    table.to_csv(out / "sweep.csv", index=False)
    if len(runs) <= MAX_OVERLAID:
        cdfs = plots.latency_cdfs({label(r, keys): r.requests() for r in runs})
        print("wrote", plots.save(cdfs, out / "cdfs.png"))
    else:
        print(f"({len(runs)} runs: too many to overlay as CDFs; the table and heatmaps "
              "summarize them)")
    if len(keys) == 2:
        for metric in HEATMAP_METRICS:
            fig = plots.heatmap(table, x=keys[0], y=keys[1], metric=metric)
            print("wrote", plots.save(fig, out / f"heatmap_{metric}.png"))
    if RATE_KEY in keys:
        cap = None
        if "slo_attainment" in slo_metrics:
            cap = capacity(table, RATE_KEY)
            if cap == table[RATE_KEY].max():
                print(f"capacity: at least {cap:g} req/s (every rate met the SLOs: sweep "
                      "higher rates to find it)")
            else:
                print(f"capacity: {cap:g} req/s (highest rate with >= 90% of requests "
                      "within SLO)")
        fig = plots.latency_vs_load(table, RATE_KEY, slos=slos_of(runs), capacity=cap)
        print("wrote", plots.save(fig, out / "latency_vs_load.png"))


def report_compare(a, b, out: Path) -> None:
    real, sim = identify(a, b)
    print(f"real: {real.path}\n      {describe(real)}\nsim:  {sim.path}\n      {describe(sim)}")
    if note := split_rule_note(real, sim):
        print(note)
    print(format_table(compare_runs(real, sim)))
    cdfs = plots.latency_cdfs({f"real ({real.name})": real.requests(),
                               f"sim ({sim.name})": sim.requests()})
    print("wrote", plots.save(cdfs, out / "compare_cdfs.png"))
    steps, model = priced_steps(real, sim)
    if steps is not None:
        errors = step_price_errors(steps)
        print(f"\nthe real run's steps priced by the simulator's cost model, {model}:")
        print(errors.to_string(index=False, float_format=lambda v: f"{v:+.2f}"))
        scatter = plots.priced_step_scatter(steps, model, errors)
    else:
        print(f"\nstep times: {model}; drawn as the two runs' steps side by side")
        scatter = plots.step_time_scatter(real.steps(), sim.steps())
    print("wrote", plots.save(scatter, out / "compare_step_time.png"))


def report_compare_sweeps(real_runs, sim_runs, out: Path) -> None:
    """Two load sweeps: runs paired by request rate, errors per rate, latency vs load."""
    real_t, sim_t = (sweep_table(runs, HEADLINE + ("mean_e2el_ms", "slo_attainment"))
                     for runs in (real_runs, sim_runs))
    for t in (real_t, sim_t):
        if RATE_KEY not in t:
            raise ValueError("comparing two folders of runs needs two load sweeps "
                             f"({RATE_KEY} varying in each)")
    paired = real_t.merge(sim_t, on=RATE_KEY, suffixes=("_real", "_sim"))
    if paired.empty:
        raise ValueError("the two sweeps share no request rate")
    rows = []
    for _, row in paired.sort_values(RATE_KEY).iterrows():
        rows.append({"req/s": row[RATE_KEY]} | {
            m: f"{percent_error(row[m + '_real'], row[m + '_sim']):+.1f}%"
            for m in LOAD_METRICS if m + "_real" in row})
    print("error (sim - real) / real by offered load:")
    print(pd.DataFrame(rows).to_string(index=False))
    slos = slos_of(real_runs)
    caps = {}
    for name, t in (("real", real_t), ("sim", sim_t)):
        if "slo_attainment" in t and not t["slo_attainment"].isna().all():
            caps[name] = capacity(t, RATE_KEY)
            print(f"{name} capacity: {caps[name]:g} req/s")
    fig = plots.latency_vs_load({"real": real_t, "sim": sim_t}, RATE_KEY, slos=slos,
                                capacity=caps or None)
    print("wrote", plots.save(fig, out / "compare_latency_vs_load.png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", help="run directories or folders of runs")
    parser.add_argument("--compare", nargs=2, metavar=("REAL", "SIM"),
                        help="a real (mode=gpu) and a simulated run, or two load sweeps")
    parser.add_argument("--out", help="folder for the PNGs (default: <first path>/analysis)")
    args = parser.parse_args(argv)
    if not args.paths and not args.compare:
        parser.error("give run or sweep directories, or --compare REAL SIM")
    first = Path(args.paths[0] if args.paths else args.compare[0])
    out = Path(args.out) if args.out else first / "analysis"
    try:
        runs = find_runs(*args.paths) if args.paths else []
        pair = [find_runs(p) for p in args.compare] if args.compare else []
        out.mkdir(parents=True, exist_ok=True)
        if len(runs) == 1:
            report_one(runs[0], out)
        elif runs:
            report_sweep(runs, out)
        if pair and len(pair[0]) == len(pair[1]) == 1:
            report_compare(pair[0][0], pair[1][0], out)
        elif pair:
            a, b = pair
            real, sim = (b, a) if (a[0].summary.get("mode"), b[0].summary.get("mode")) == \
                ("sim", "gpu") else (a, b)
            report_compare_sweeps(real, sim, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
