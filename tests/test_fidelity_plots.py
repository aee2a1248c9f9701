"""The fidelity table's figures (analysis.plots.fidelity_vs_load / fidelity_effects, drawn by
run_fidelity.py's table stage): what each panel shows is read back from the figure."""
import numpy as np
import pandas as pd

import bench_scripts
from analysis import plots
from matplotlib.figure import Figure

MODELS = ("roofline", "fitted")


def table(traces=("sharegpt", "azure_conv"), rates=(4.0, 8.0, 12.0, 16.0), capacity=13.0):
    rows = []
    for trace in traces:
        for i, rate in enumerate(rates):
            for model in MODELS:
                for metric, _ in plots.FIDELITY_METRICS:
                    real = 10.0 + rate + i
                    rows.append({"cell": f"{trace}-L{i}", "trace": trace, "load": f"{rate:g}rps",
                                 "below_capacity": rate < capacity, "pair": None, "cost_model": model,
                                 "metric": metric, "real": real, "sim": real * (1.1 if model == "roofline" else 1.01),
                                 "real_spread": 0.04})
            for model in MODELS:      # a pair cell at this load: never drawn against load
                rows.append({"cell": f"{trace}-L{i}-policy1", "trace": trace, "load": f"{rate:g}rps",
                             "below_capacity": True, "pair": "policy", "cost_model": model,
                             "metric": "mean_ttft_ms", "real": 1e6, "sim": 1e6, "real_spread": 0.0})
    return pd.DataFrame(rows)


def test_load_figure_has_a_row_per_trace_with_real_points_and_a_line_per_cost_model():
    fig = plots.fidelity_vs_load(table())
    assert len(fig.axes) == 2 * len(plots.FIDELITY_METRICS)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("azure_conv") and titles[len(plots.FIDELITY_METRICS)].startswith("sharegpt")
    ax = fig.axes[1]                                      # azure_conv, mean TTFT
    lines = {line.get_label(): line for line in ax.get_lines()}
    for model in MODELS:
        x, y = lines[f"sim, {model}"].get_data()
        assert list(x) == [4.0, 8.0, 12.0, 16.0]          # sorted by load, pair cells left out
        assert max(y) < 1e5
    real = next(c for c in ax.containers if c.get_label().startswith("real"))
    x, y = real.lines[0].get_data()
    assert list(x) == [4.0, 8.0, 12.0, 16.0] and np.allclose(y, [14.0, 19.0, 24.0, 29.0])
    capacity = [line for line in ax.get_lines() if line.get_label().startswith("capacity")]
    assert len(capacity) == 1 and capacity[0].get_xdata()[0] == 14.0   # between the last below and the first past


def test_capacity_line_at_each_traces_capacity_where_given():
    fig = plots.fidelity_vs_load(table(), {"azure_conv": 13.0, "sharegpt": 12.5})
    n = len(plots.FIDELITY_METRICS)
    for ax, at in ((fig.axes[0], 13.0), (fig.axes[n + 2], 12.5)):   # an azure_conv and a sharegpt panel
        capacity = [line for line in ax.get_lines() if line.get_label().startswith("capacity")]
        assert len(capacity) == 1 and capacity[0].get_xdata()[0] == at


def test_table_stage_marks_the_capacity_json_figures(tmp_path, monkeypatch):
    run_fidelity = bench_scripts.load("benchmarks/fidelity/run_fidelity.py")
    drawn = []
    monkeypatch.setattr(plots, "fidelity_vs_load", lambda t, capacity=None: drawn.append(capacity) or Figure())
    capacity = {"azure_conv": {"capacity_rps": 13.0, "native_rps": 2.3}, "sharegpt": {"capacity_rps": 12.5, "native_rps": None}}
    run_fidelity.figures(table(), pd.DataFrame(), tmp_path, capacity)
    assert drawn == [{"azure_conv": 13.0, "sharegpt": 12.5}]


def test_no_capacity_line_when_every_cell_is_below_it():
    fig = plots.fidelity_vs_load(table(capacity=100.0))
    assert not [line for line in fig.axes[0].get_lines() if line.get_label().startswith("capacity")]


def test_effects_figure_counts_and_marks_the_pairs_within_target():
    rows = []
    for model in MODELS:
        for k, (measured, predicted, within) in enumerate(((0.10, 0.11, True), (-0.05, -0.04, True),
                                                           (0.02, -0.01, False))):
            rows.append({"cell": "c", "pair": ("policy", "budget", "policy")[k], "cost_model": model,
                         "metric": "mean_tpot_ms", "measured_change": measured,
                         "predicted_change": predicted if model == "fitted" else -predicted,
                         "within_target": within if model == "fitted" else False})
    fig = plots.fidelity_effects(pd.DataFrame(rows))
    fitted, roofline = fig.axes
    assert fitted.get_title().startswith("fitted: 2 / 3") and roofline.get_title().startswith("roofline: 0 / 3")
    hollow = [c for c in fitted.collections if len(c.get_offsets()) and not len(c.get_facecolor())]
    filled = [c for c in fitted.collections if len(c.get_offsets()) and len(c.get_facecolor())
              and c.get_label() in ("policy", "budget")]
    assert sum(len(c.get_offsets()) for c in hollow) == 1 and sum(len(c.get_offsets()) for c in filled) == 2
    xmin, xmax = fitted.get_xlim()
    assert xmin <= -10 and xmax >= 10                     # every change is on the axes


def test_table_stage_draws_what_the_table_holds(tmp_path):
    run_fidelity = bench_scripts.load("benchmarks/fidelity/run_fidelity.py")
    text = run_fidelity.figures(table(), pd.DataFrame(), tmp_path / "loads")
    assert sorted(p.name for p in (tmp_path / "loads").iterdir()) == ["fidelity_vs_load.png"]
    assert "(fidelity_vs_load.png)" in text and "effects" not in text
    one_load = table(rates=(8.0,))
    effects = pd.DataFrame([{"cell": "c", "pair": "policy", "cost_model": "fitted", "metric": "mean_tpot_ms",
                             "measured_change": 0.1, "predicted_change": 0.1, "within_target": True}])
    text = run_fidelity.figures(one_load, effects, tmp_path / "pairs")   # a line needs two loads
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == ["fidelity_effects.png"]
    assert "(fidelity_effects.png)" in text and "vs_load" not in text


def test_effects_figure_bars_each_miss_with_its_sampling_interval():
    rows = [{"cell": "c", "pair": "policy", "cost_model": "fitted", "metric": m, "measured_change": meas,
             "predicted_change": pred, "within_target": hit, "sampling_lo": lo, "sampling_hi": hi,
             "within_sampling": lo <= pred <= hi if lo == lo else False}
            for m, meas, pred, hit, lo, hi in (("mean_tpot_ms", 0.10, 0.11, True, 0.08, 0.12),
                                               ("p90_ttft_ms", 0.27, 0.15, False, 0.10, 0.46),
                                               ("p99_itl_ms", 0.34, 0.16, False, 0.28, 0.44),
                                               ("request_throughput", 0.001, -0.001, False, np.nan, np.nan))]
    ax = plots.fidelity_effects(pd.DataFrame(rows)).axes[0]
    bars = [c for c in ax.containers if c.get_label().startswith("a miss's sampling interval")]
    assert len(bars) == 1
    segments = bars[0].lines[2][0].get_segments()       # the misses with an interval, not the hit
    assert sorted((round(a[0], 6), round(b[0], 6)) for a, b in segments) == [(10.0, 46.0), (28.0, 44.0)]
    assert ax.get_title().endswith("1 / 3 misses inside their sampling interval")
