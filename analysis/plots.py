"""Figures from result tables. Each function returns a matplotlib Figure (built without
pyplot, so no global state or display is needed); `save` writes it as a PNG.

Conventions, so a figure can go into a paper as it is: every series has its own colour and
line style (`series_style`, distinct for any number of series); axes and colour bars say
what they show and in which unit (`LABELS`); figure sizes are bounded whatever the data;
relative errors are signed percentages, (sim - real) / real.
"""
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from analysis.compare import STEP_KINDS
from analysis.metrics import format_value, latency_samples

CDF_METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2EL"))
MAX_WIDTH_IN, MAX_HEIGHT_IN = 16.0, 11.0
COLORS = colormaps["tab10"].colors
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = (None, "o", "s", "^", "v", "D", "x", "+")
# Readable names for config keys and metrics (anything else is shown as it is).
LABELS = {
    "cache.block_size": "KV block size (tokens)",
    "cache.num_blocks": "KV pool (blocks)",
    "cache.gpu_memory_utilization": "GPU memory share",
    "cache.enable_prefix_caching": "prefix caching",
    "scheduler.max_num_seqs": "max sequences per step",
    "scheduler.max_num_batched_tokens": "token budget per step",
    "scheduler.policy": "scheduler",
    "trace.request_rate": "request rate (req/s)",
    "p99_ttft_ms": "p99 TTFT (ms)", "median_ttft_ms": "median TTFT (ms)",
    "mean_ttft_ms": "mean TTFT (ms)", "p99_tpot_ms": "p99 TPOT (ms)",
    "median_tpot_ms": "median TPOT (ms)", "mean_tpot_ms": "mean TPOT (ms)",
    "p99_itl_ms": "p99 ITL (ms)", "p99_e2el_ms": "p99 E2EL (ms)",
    "output_throughput": "output throughput (tok/s)",
    "request_throughput": "request throughput (req/s)",
    "request_goodput": "goodput (req/s)", "slo_attainment": "share of requests within SLO",
    "num_preemptions": "preemptions", "prefix_cache_hit_rate": "prefix-cache hit rate",
}
HIGHER_IS_BETTER = ("throughput", "goodput", "slo_attainment", "hit_rate")


def label_of(key: str) -> str:
    return LABELS.get(key, key)


def series_style(i: int) -> dict:
    """Colour, line style and marker of series `i`: the first 10 differ in colour, the next
    10 repeat the colours dashed, and so on; past 40 a marker is added. Distinct for any
    `i` below 320, and never the same as a neighbour."""
    marker = MARKERS[(i // (len(COLORS) * len(LINE_STYLES))) % len(MARKERS)]
    return {"color": COLORS[i % len(COLORS)], "linestyle": LINE_STYLES[(i // len(COLORS))
                                                                       % len(LINE_STYLES)],
            "marker": marker, "markevery": 0.1 if marker else None}


def _bounded(width: float, height: float) -> tuple[float, float]:
    return min(width, MAX_WIDTH_IN), min(height, MAX_HEIGHT_IN)


def _log_ticks(axis) -> None:
    """Plain-number labels on a log axis (call after plotting): at 1, 2, 5 x 10^k on short
    ranges, where matplotlib's defaults overlap or vanish, at powers of 10 on long ones."""
    low, high = axis.get_view_interval()
    short = low > 0 and math.log10(high / low) <= 2.5
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if short else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v)))
    axis.set_minor_formatter(NullFormatter())


def save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _figure_legend(fig: Figure, ax, n: int) -> None:
    """One legend for the figure: below the panels, in as many columns as fit."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize="small",
                   ncols=max(1, min(n, 4)), frameon=False)


def latency_cdfs(runs: dict[str, pd.DataFrame]) -> Figure:
    """ECDFs of TTFT, TPOT and E2EL, one line per run: {label: requests table}. Each panel
    picks its unit (ms, or s past 20 s) and scale (log when the values span 10x or more)."""
    rows = -(-len(runs) // 4)     # legend rows below the panels
    fig = Figure(figsize=_bounded(15, 4.2 + 0.22 * rows), layout="constrained")
    axes = fig.subplots(1, len(CDF_METRICS))
    samples = {label: latency_samples(df) for label, df in runs.items()}
    for ax, (key, title) in zip(axes, CDF_METRICS):
        values = [s[key] for s in samples.values() if s[key].size]
        pooled = np.concatenate(values) if values else np.ones(1)
        seconds = np.nanmax(pooled) > 20.0
        scale, unit = (1.0, "s") if seconds else (1000.0, "ms")
        positive = pooled[pooled > 0]
        log = positive.size > 0 and positive.max() / positive.min() >= 10
        for i, (label, s) in enumerate(samples.items()):
            if s[key].size:
                ax.ecdf(s[key] * scale, label=label, lw=1.4, **series_style(i))
        ax.set(xlabel=f"{title} ({unit})", ylabel="fraction of requests", title=title)
        if log:
            ax.set_xscale("log")
            _log_ticks(ax.xaxis)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(6))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v)))
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes[0], len(runs))
    return fig


def _break_idle_gaps(rows: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """x, y of a step series with a NaN point wherever the executor sat idle (the next step
    starts well after the previous one ended), so no line is drawn across the gap."""
    start = rows["start_s"].to_numpy(float)
    end = start + rows["duration_s"].to_numpy(float)
    y = rows[column].to_numpy(float)
    if len(start) < 2:
        return end, y
    gap = start[1:] - end[:-1]
    idle = gap > max(0.05, 10 * float(np.median(rows["duration_s"])))
    cut = np.flatnonzero(idle) + 1
    # plot each step's value at its end (steps-pre: held over the step); NaN after idle
    x = np.insert(end, cut, end[cut - 1])
    y = np.insert(y, cut, np.nan)
    return x, y


def timeline(steps: pd.DataFrame) -> Figure:
    """KV usage, batch size and step time over the run, one line per replica (a legend when
    there are several); an idle executor shows as a gap, not a line."""
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    series = (("kv_usage", "KV cache in use (%)", 100.0), ("num_seqs", "sequences in step", 1.0),
              ("duration_s", "step time (ms)", 1000.0))
    replicas = sorted(steps["replica"].unique()) if "replica" in steps else [0]
    for i, replica in enumerate(replicas):
        rows = steps[steps["replica"] == replica] if "replica" in steps else steps
        style = series_style(i) | {"marker": None, "markevery": None}
        for ax, (column, label, scale) in zip(axes, series):
            if column not in rows:
                continue
            x, y = _break_idle_gaps(rows, column)
            ax.plot(x, y * scale, lw=0.8, drawstyle="steps-pre", label=f"replica {replica}",
                    **style)
            ax.set_ylabel(label)
    axes[-1].set_xlabel("time since the start of the replay (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    if len(replicas) > 1:
        _figure_legend(fig, axes[0], len(replicas))
    return fig


def latency_vs_load(tables: pd.DataFrame | dict[str, pd.DataFrame],
                    rate_key: str = "trace.request_rate", slos: dict | None = None,
                    capacity: float | dict | None = None) -> Figure:
    """Median and p99 TTFT and TPOT, and throughput, against the offered request rate; one
    sweep (a sweep table) or several ({label: table}, e.g. real and sim). `slos`
    ({"ttft_ms", "tpot_ms"}) draw the objectives as horizontal lines; `capacity` (req/s, or
    {label: req/s}) a vertical line where the SLOs stop being met."""
    if isinstance(tables, pd.DataFrame):
        tables = {"": tables}
    capacities = capacity if isinstance(capacity, dict) else {"": capacity}
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax_ttft, ax_tpot, ax_thr = fig.subplots(1, 3)
    # colour = the statistic, line style = the source (real solid, sim dashed, ...)
    for i, (name, table) in enumerate(tables.items()):
        table = table.sort_values(rate_key)
        rate = table[rate_key]
        prefix = f"{name} " if name else ""
        line = LINE_STYLES[i % len(LINE_STYLES)]
        for ax, key in ((ax_ttft, "ttft"), (ax_tpot, "tpot")):
            for j, stat in enumerate(("median", "p99")):
                column = f"{stat}_{key}_ms"
                if column in table:
                    ax.plot(rate, table[column], color=COLORS[j], linestyle=line,
                            marker="o^"[j], label=f"{prefix}{stat}")
        ax_thr.plot(rate, table["request_throughput"], color=COLORS[0], linestyle=line,
                    marker="o", label=f"{prefix}throughput")
        if "request_goodput" in table:
            ax_thr.plot(rate, table["request_goodput"], color=COLORS[1], linestyle=line,
                        marker="^", label=f"{prefix}goodput")
    all_rates = pd.concat([t[rate_key] for t in tables.values()])
    ax_thr.plot([all_rates.min(), all_rates.max()], [all_rates.min(), all_rates.max()],
                ls="--", color="grey", lw=1, label="offered")
    for ax, key in ((ax_ttft, "ttft_ms"), (ax_tpot, "tpot_ms")):
        if slos and slos.get(key):
            ax.axhline(slos[key], color="firebrick", ls="--", lw=1,
                       label=f"SLO {slos[key]:g} ms")
    for i, (name, rate) in enumerate(capacities.items()):
        if rate is not None and np.isfinite(rate):
            for ax in (ax_ttft, ax_tpot, ax_thr):
                ax.axvline(rate, color=("black", "dimgrey")[i % 2], ls=(":", "-.")[i % 2],
                           lw=1.2, label=f"{name + ' ' if name else ''}capacity {rate:g} req/s")
    for ax, title in ((ax_ttft, "TTFT (ms)"), (ax_tpot, "TPOT (ms)")):
        ax.set(xlabel=label_of(rate_key), ylabel=title, yscale="log", title=title)
        _log_ticks(ax.yaxis)
    ax_thr.set(xlabel=label_of(rate_key), ylabel="req/s", title="throughput")
    for ax in (ax_ttft, ax_tpot, ax_thr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def heatmap(table: pd.DataFrame, x: str, y: str, metric: str) -> Figure:
    """`metric` over a two-parameter sweep (e.g. cache.block_size x scheduler.max_num_seqs);
    cells with several runs show their mean. Cells are labelled with their value up to 16
    columns; the colour bar names the metric and whether higher or lower is better."""
    grid = table.pivot_table(index=y, columns=x, values=metric, aggfunc="mean")
    values = grid.to_numpy(float)
    fig = Figure(figsize=_bounded(1.3 * len(grid.columns) + 3.5, 0.6 * len(grid.index) + 2.4),
                 layout="constrained")
    ax = fig.subplots()
    better = "higher" if any(k in metric for k in HIGHER_IS_BETTER) else "lower"
    finite = values[np.isfinite(values)]
    # a log colour scale when values span more than 50x: otherwise one overloaded cell
    # leaves every other cell the same colour
    wide = finite.size and finite.min() > 0 and finite.max() / finite.min() > 50
    image = ax.imshow(values, cmap="viridis", aspect="auto", origin="lower",
                      norm=LogNorm() if wide else None)
    ax.set(xticks=range(len(grid.columns)), xticklabels=[f"{v:g}" if isinstance(v, float)
                                                          else str(v) for v in grid.columns],
           yticks=range(len(grid.index)), yticklabels=[str(v) for v in grid.index],
           xlabel=label_of(x), ylabel=label_of(y),
           title=f"{label_of(metric)}, {better} is better")
    if len(grid.columns) > 8:
        ax.tick_params(axis="x", labelrotation=45)
    if len(grid.columns) <= 16 and len(grid.index) <= 24:
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                bright = image.norm(value) > 0.6   # viridis is light at the top: dark text
                ax.text(j, i, format_value(value), ha="center", va="center", fontsize="small",
                        color="black" if bright else "white")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(label_of(metric) + (" (log scale)" if wide else ""))
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v)))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    return fig


def step_time_scatter(real: pd.DataFrame, sim: pd.DataFrame) -> Figure:
    """Predicted (sim) against measured (real) step time. When both runs made the same
    steps (a replay, or the same schedule), one point per step; otherwise one point per
    step shape: steps grouped by kind (decode-only or with prefill) and batched tokens
    (powers of 2), mean time of each group, sized by how many real steps it holds."""
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    shape = ["num_seqs", "num_batched_tokens"]
    same = (len(real) == len(sim) and all(c in real and c in sim for c in shape)
            and (real[shape].to_numpy() == sim[shape].to_numpy()).all())
    kinds = (("decode-only steps", 0), ("steps with prefill", 1))
    if same:
        for i, (label, k) in enumerate(kinds):
            rows = (real["num_prefill_tokens"] > 0) == bool(k)
            ax.scatter(real["duration_s"][rows] * 1e3, sim["duration_s"][rows] * 1e3, s=6,
                       alpha=0.5, color=COLORS[i], label=label)
        title = "each step"
    else:
        for i, (label, k) in enumerate(kinds):
            means = [_binned_step_times(t, k) for t in (real, sim)]
            both = means[0].join(means[1], lsuffix="_real", rsuffix="_sim", how="inner")
            if len(both):
                ax.scatter(both["mean_real"] * 1e3, both["mean_sim"] * 1e3,
                           s=12 + 60 * both["count_real"] / both["count_real"].max(),
                           color=COLORS[i], marker="os"[i], label=label)
        title = "mean per step shape (kind, batched tokens in powers of 2)"
    _diagonal(ax)
    ax.set(xlabel="measured step time (ms)", ylabel="predicted step time (ms)", title=f"step time, {title}")
    return fig


def priced_step_scatter(steps: pd.DataFrame, model: str, errors: pd.DataFrame) -> Figure:
    """Each real step's measured device time against the simulator cost model's price of it
    (analysis.compare.priced_steps), decode-only steps and steps with prefill apart, each
    labelled with its row of `errors` (analysis.compare.step_price_errors)."""
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    weighted = dict(zip(errors["kind"], errors["weighted_error_pct"])) if len(errors) else {}
    for i, label in enumerate(STEP_KINDS):
        part = steps[(steps["num_prefill_tokens"] > 0) == bool(i)]
        if len(part):
            ax.scatter(part["device_s"] * 1e3, part["pred_s"] * 1e3, s=6, alpha=0.4, color=COLORS[i],
                       marker="os"[i], label=f"{label} ({len(part)}; time-weighted {weighted[label]:+.1f}%)")
    _diagonal(ax)
    ax.set(xlabel="measured device time (ms)", ylabel="predicted device time (ms)",
           title=f"each real step against the simulator's price of it\n(cost model: {model})")
    return fig


FIDELITY_METRICS = (("request_throughput", "throughput (req/s)"), ("mean_ttft_ms", "mean TTFT (ms)"),
                    ("p90_ttft_ms", "p90 TTFT (ms)"), ("mean_tpot_ms", "mean TPOT (ms)"),
                    ("mean_e2el_ms", "mean E2EL (ms)"))


def _fitted_first(models) -> list:
    """A fidelity table's cost models, the fitted one first."""
    return sorted(models, key=lambda m: (m != "fitted", m))


def _offered_rate(load) -> float:
    """A fidelity cell's load as run_fidelity writes it ("15.9rps") in req/s."""
    return float(str(load).removesuffix("rps"))


def fidelity_vs_load(table: pd.DataFrame, capacity: dict[str, float] | None = None) -> Figure:
    """The fidelity table (benchmarks/fidelity/run_fidelity.py's table.csv) as latency and
    throughput against load: one row of panels per trace, the real runs as points (the mean of
    the repeats, the bar their min-max range) and each cost model as a line, and a dotted line
    where the trace's cells turn from below capacity to past it: at `capacity[trace]` (req/s,
    the capacity the cells were placed by: run_fidelity's capacity.json) where given, else
    half way between the last cell below and the first past. Pair cells are left out."""
    base = table[table["pair"].isna()].assign(rate=lambda t: t["load"].map(_offered_rate))
    traces = sorted(base["trace"].unique())
    models = _fitted_first(base["cost_model"].unique())
    fig = Figure(figsize=_bounded(3.2 * len(FIDELITY_METRICS), 2.9 * len(traces) + 0.6),
                 layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(traces), len(FIDELITY_METRICS), squeeze=False))
    for row, trace in zip(axes, traces):
        cells = base[base["trace"] == trace]
        below, past = cells[cells["below_capacity"]]["rate"], cells[~cells["below_capacity"]]["rate"]
        for ax, (metric, title) in zip(row, FIDELITY_METRICS):
            rows = cells[cells["metric"] == metric].sort_values("rate")
            real = rows.drop_duplicates("cell")
            ax.errorbar(real["rate"], real["real"], yerr=real["real"] * real["real_spread"] / 2,
                        color="black", marker="o", ls="none", capsize=3,
                        label="real (mean of the repeats; bar: their range)")
            for i, model in enumerate(models):
                sim = rows[rows["cost_model"] == model]
                ax.plot(sim["rate"], sim["sim"], **{**series_style(i), "marker": "s"}, label=f"sim, {model}")
            if len(below) and len(past):
                at = (capacity or {}).get(trace, (below.max() + past.min()) / 2)
                ax.axvline(at, color="grey", ls=":", lw=1.2, label="capacity (cells right of it are past it)")
            ax.set(title=f"{trace}: {title}", xlabel="offered load (req/s)")
            ax.grid(alpha=0.3)
    _figure_legend(fig, axes[0][0], 2 + len(models))
    return fig


def fidelity_effects(effects: pd.DataFrame, tolerance_pp: float = 3.0, linthresh: float = 10.0) -> Figure:
    """The policy-effect pairs (run_fidelity.py's effects.csv): per cost model, each pair's
    predicted change of a metric against its measured change (%), filled where within target
    (same sign and within `tolerance_pp` points; TTFT's 5 points are counted in the title's
    tally, the band shows the common `tolerance_pp`), hollow where not, a miss with its
    measured change's sampling interval (effects' sampling_lo / sampling_hi, where present)
    drawn as a bar along the measured axis; symlog axes, linear within +-`linthresh` points."""
    models = _fitted_first(effects["cost_model"].unique())
    pairs = sorted(effects["pair"].unique())
    fig = Figure(figsize=_bounded(5.2 * len(models), 5.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(models), squeeze=False)[0])
    span = 100 * float(np.nanmax(np.abs(effects[["measured_change", "predicted_change"]].to_numpy(float))))
    span = max(span * 1.05, 2 * tolerance_pp)
    grid = np.linspace(-span, span, 401)          # dense: the band bends on the symlog axes
    # +-50 and +-100 sit a factor 2 apart on the log part: with both the labels run together
    ticks = [t for t in (-100, -50, -10, -5, 0, 5, 10, 50, 100)
             if abs(t) <= span and not (abs(t) == 50 and span >= 100)]
    for ax, model in zip(axes, models):
        rows = effects[effects["cost_model"] == model]
        ax.fill_between(grid, grid - tolerance_pp, grid + tolerance_pp, color="grey", alpha=0.15,
                        label=f"within {tolerance_pp:g} points")
        ax.plot(grid, grid, color="grey", ls="--", lw=1, label="predicted = measured")
        for i, pair in enumerate(pairs):
            p = rows[rows["pair"] == pair]
            hit = p["within_target"].astype(bool)
            color, marker = COLORS[i % len(COLORS)], MARKERS[1 + i % (len(MARKERS) - 1)]
            ax.scatter(100 * p["measured_change"][hit], 100 * p["predicted_change"][hit], s=22,
                       color=color, marker=marker, label=pair)
            ax.scatter(100 * p["measured_change"][~hit], 100 * p["predicted_change"][~hit], s=22,
                       facecolors="none", edgecolors=[color], marker=marker)
        missed = rows[~rows["within_target"].astype(bool)]
        sampled = missed[missed["sampling_lo"].notna()] if "sampling_lo" in rows.columns else missed.iloc[:0]
        if len(sampled):   # the percentile interval need not hold the full sample's change: clip
            ax.errorbar(100 * sampled["measured_change"], 100 * sampled["predicted_change"],
                        xerr=[100 * (sampled["measured_change"] - sampled["sampling_lo"]).clip(lower=0),
                              100 * (sampled["sampling_hi"] - sampled["measured_change"]).clip(lower=0)],
                        fmt="none", ecolor="grey", elinewidth=0.8, capsize=2,
                        label="a miss's sampling interval (5-95%)")
        inside = (f"\n{int(missed['within_sampling'].astype(bool).sum())} / {len(missed)} misses inside "
                  "their sampling interval" if "within_sampling" in rows.columns else "")
        ax.axhline(0, color="black", lw=0.6)
        ax.axvline(0, color="black", lw=0.6)
        # linear within +-linthresh points, where most changes and the band lie; log beyond
        for axis in ("x", "y"):
            getattr(ax, f"set_{axis}scale")("symlog", linthresh=linthresh, linscale=1.5)
            getattr(ax, f"set_{axis}ticks")(ticks, [f"{t:g}" for t in ticks])
        ax.set(xlim=(-span, span), ylim=(-span, span), xlabel="measured change (%)",
               ylabel="predicted change (%)",
               title=f"{model}: {int(rows['within_target'].sum())} / {len(rows)} within target "
                     f"(hollow: not){inside}")
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes[0], 3 + len(pairs))
    return fig


def _diagonal(ax) -> None:
    """sim = real, log axes labelled in plain numbers (1, 2, 5 per decade)."""
    ax.set(xscale="log", yscale="log")
    low = min(ax.get_xlim()[0], ax.get_ylim()[0])
    high = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([low, high], [low, high], color="grey", ls="--", lw=1, label="sim = real")
    ax.set(xlim=(low, high), ylim=(low, high))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _binned_step_times(steps: pd.DataFrame, prefill: int) -> pd.DataFrame:
    rows = steps[(steps["num_prefill_tokens"] > 0) == bool(prefill)]
    bins = np.floor(np.log2(rows["num_batched_tokens"].clip(lower=1))).astype(int)
    grouped = rows.groupby(bins)["duration_s"]
    return pd.DataFrame({"mean": grouped.mean(), "count": grouped.size()})
