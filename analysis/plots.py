"""Figures from result tables. Each function returns a matplotlib Figure (built without
pyplot, so no global state or display is needed); `save` writes it as a PNG.
"""
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis.metrics import latency_samples

CDF_METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2EL"))


def _log_ticks(axis) -> None:
    """Plain-number labels on a log axis (call after plotting): at 1, 2, 5 x 10^k on short
    ranges, where matplotlib's defaults overlap or vanish, at powers of 10 on long ones."""
    low, high = axis.get_view_interval()
    short = low > 0 and math.log10(high / low) <= 2.5
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if short else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def latency_cdfs(runs: dict[str, pd.DataFrame]) -> Figure:
    """ECDFs of TTFT, TPOT and E2EL (ms, log x), one line per run: {label: requests table}."""
    fig = Figure(figsize=(15, 4), layout="constrained")
    axes = fig.subplots(1, len(CDF_METRICS))
    samples = {label: latency_samples(df) for label, df in runs.items()}
    for ax, (key, title) in zip(axes, CDF_METRICS):
        for label, s in samples.items():
            values = s[key] * 1000.0
            if values.size:
                ax.ecdf(values, label=label)
        ax.set(xscale="log", xlabel=f"{title} (ms)", ylabel="fraction of requests", title=title)
        _log_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return fig


def timeline(steps: pd.DataFrame) -> Figure:
    """KV usage, batch size and step time over the run, one line per replica."""
    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    series = (("kv_usage", "KV cache usage"), ("num_seqs", "sequences in step"),
              ("duration_s", "step time (s)"))
    for replica, rows in steps.groupby("replica"):
        for ax, (column, label) in zip(axes, series):
            ax.plot(rows["start_s"], rows[column], lw=0.8, label=f"replica {replica}")
            ax.set_ylabel(label)
    axes[-1].set_xlabel("time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def latency_vs_load(table: pd.DataFrame, rate_key: str = "trace.request_rate") -> Figure:
    """Median/p99 TTFT and TPOT, and throughput, against the offered request rate."""
    table = table.sort_values(rate_key)
    rate = table[rate_key]
    fig = Figure(figsize=(15, 4), layout="constrained")
    ax_ttft, ax_tpot, ax_thr = fig.subplots(1, 3)
    for ax, key in ((ax_ttft, "ttft"), (ax_tpot, "tpot")):
        for stat in ("median", "p99"):
            column = f"{stat}_{key}_ms"
            if column in table:
                ax.plot(rate, table[column], marker="o", label=stat)
        ax.set(xlabel="request rate (req/s)", ylabel=f"{key.upper()} (ms)", yscale="log")
        _log_ticks(ax.yaxis)
        ax.legend()
    ax_thr.plot(rate, table["request_throughput"], marker="o", label="throughput")
    if "request_goodput" in table:
        ax_thr.plot(rate, table["request_goodput"], marker="o", label="goodput")
    ax_thr.plot(rate, rate, ls="--", color="grey", label="offered")
    ax_thr.set(xlabel="request rate (req/s)", ylabel="req/s")
    ax_thr.legend()
    for ax in (ax_ttft, ax_tpot, ax_thr):
        ax.grid(alpha=0.3)
    return fig


def heatmap(table: pd.DataFrame, x: str, y: str, metric: str) -> Figure:
    """`metric` over a two-parameter sweep (e.g. cache.block_size x scheduler.max_num_seqs);
    cells with several runs show their mean."""
    grid = table.pivot_table(index=y, columns=x, values=metric, aggfunc="mean")
    fig = Figure(figsize=(1.4 * len(grid.columns) + 3, 0.8 * len(grid.index) + 2),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(float), cmap="viridis", aspect="auto")
    ax.set(xticks=range(len(grid.columns)), xticklabels=grid.columns,
           yticks=range(len(grid.index)), yticklabels=grid.index, xlabel=x, ylabel=y,
           title=metric)
    for (i, j), value in np.ndenumerate(grid.to_numpy(float)):
        bright = image.norm(value) > 0.6       # viridis is light at the top: dark text there
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize="small",
                color="black" if bright else "white")
    fig.colorbar(image, ax=ax)
    return fig
