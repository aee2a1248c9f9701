"""analysis/: metric definitions (vllm bench serve semantics), run loading, sweep tables,
capacity, A-vs-B comparison, figures and the CLI. Expected values are recomputed here from
the definitions, independently of analysis/metrics.py."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import plots
from analysis.__main__ import main as analysis_main
from analysis.compare import compare_metrics, identify, percent_error
from analysis.metrics import compute_metrics, format_report, latency_samples
from analysis.runs import capacity, find_runs, load_run, sweep_table, varying_keys

REPO = Path(__file__).resolve().parents[1]


def request(rid, arrival, token_times, prompt_len=10, cached=0, preemptions=0, reason="length"):
    """A requests.parquet row; first token and finish come from the token times."""
    return {"request_id": rid, "replica": 0, "arrival_s": arrival,
            "first_scheduled_s": arrival if token_times else math.nan,
            "first_token_s": token_times[0] if token_times else math.nan,
            "finish_s": token_times[-1] if token_times else math.nan,
            "prompt_len": prompt_len, "output_len": len(token_times),
            "cached_prompt_tokens": cached, "num_preemptions": preemptions,
            "token_times_s": list(token_times), "finish_reason": reason}


@pytest.fixture
def table():
    # a: many small gaps; b: few large gaps (TPOT per request vs pooled ITL differ);
    # c: one output token (no TPOT); d: aborted (not completed).
    rows = [request("a", 0.0, [0.10 + 0.01 * k for k in range(21)], prompt_len=100, cached=32),
            request("b", 0.5, [0.80, 1.30, 1.80], prompt_len=40, preemptions=1),
            request("c", 1.2, [1.45], prompt_len=7),
            request("d", 1.5, [], prompt_len=9, reason="abort")]
    return pd.DataFrame(rows)


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default), written out."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def test_latency_definitions(table):
    m = compute_metrics(table)
    done = [r for r in table.to_dict("records") if r["finish_reason"] != "abort"]
    ttft = [(r["first_token_s"] - r["arrival_s"]) * 1000 for r in done]
    e2el = [(r["finish_s"] - r["arrival_s"]) * 1000 for r in done]
    tpot = [(r["finish_s"] - r["first_token_s"]) / (r["output_len"] - 1) * 1000
            for r in done if r["output_len"] > 1]
    itl = [(t1 - t0) * 1000 for r in done
           for t0, t1 in zip(r["token_times_s"], r["token_times_s"][1:])]
    assert len(tpot) == 2 and len(itl) == 20 + 2       # c has no TPOT and no gap
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        mean = sum(values) / len(values)
        assert m[f"mean_{name}_ms"] == pytest.approx(mean)
        assert m[f"median_{name}_ms"] == pytest.approx(percentile(values, 50))
        assert m[f"p90_{name}_ms"] == pytest.approx(percentile(values, 90))
        assert m[f"p99_{name}_ms"] == pytest.approx(percentile(values, 99))
        assert m[f"std_{name}_ms"] == pytest.approx(
            math.sqrt(sum((x - mean) ** 2 for x in values) / len(values)))
    assert m["max_itl_ms"] == pytest.approx(max(itl))
    # the trap: per-request TPOT weighs b as much as a; pooled ITL weighs a's 20 gaps more
    assert m["mean_tpot_ms"] != pytest.approx(m["mean_itl_ms"])


def test_counts_throughput_and_cache(table):
    m = compute_metrics(table)
    done = table[table["finish_reason"] != "abort"]
    duration = done["finish_s"].max()
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["duration_s"] == pytest.approx(duration)
    assert m["total_input_tokens"] == 100 + 40 + 7
    assert m["total_output_tokens"] == 21 + 3 + 1
    assert m["request_throughput"] == pytest.approx(3 / duration)
    assert m["output_throughput"] == pytest.approx(25 / duration)
    assert m["total_token_throughput"] == pytest.approx((147 + 25) / duration)
    assert m["prefix_cache_hit_rate"] == pytest.approx(32 / 147)
    assert m["num_preemptions"] == 1
    assert m["mean_concurrency"] == pytest.approx(
        sum(done["finish_s"] - done["arrival_s"]) / duration)
    # an explicit duration (the executor's) replaces the default
    assert compute_metrics(table, duration_s=10.0)["request_throughput"] == pytest.approx(0.3)
    assert "request_goodput" not in m


def test_goodput_counts_requests_meeting_every_slo(table):
    done = [r for r in table.to_dict("records") if r["finish_reason"] != "abort"]
    duration = max(r["finish_s"] for r in done)

    def expected(ttft_ms=None, tpot_ms=None):
        good = 0
        for r in done:
            ttft = (r["first_token_s"] - r["arrival_s"]) * 1000
            tpot = ((r["finish_s"] - r["first_token_s"]) / (r["output_len"] - 1) * 1000
                    if r["output_len"] > 1 else 0.0)       # one token: TPOT counts as 0
            good += (ttft_ms is None or ttft <= ttft_ms) and (tpot_ms is None or tpot <= tpot_ms)
        return good

    for slos in ({"ttft_ms": 260}, {"tpot_ms": 20}, {"ttft_ms": 260, "tpot_ms": 20},
                 {"ttft_ms": 1e9, "tpot_ms": 1e9}, {"ttft_ms": 1e-3}):
        m = compute_metrics(table, slos=slos)
        assert m["request_goodput"] == pytest.approx(expected(**slos) / duration), slos
        assert m["slo_attainment"] == pytest.approx(expected(**slos) / 3), slos
    # the SLO values above split the requests: not all-or-nothing
    assert 0 < expected(ttft_ms=260) < 3 and 0 < expected(tpot_ms=20) < 3
    with pytest.raises(ValueError, match="unknown SLO"):
        compute_metrics(table, slos={"ttft": 100})


def test_peaks_from_one_second_bins():
    rows = [request("a", 0.2, [0.5, 0.6, 0.7, 1.1]),
            request("b", 0.9, [1.2, 1.3, 1.4, 1.5, 1.6, 2.5]),
            request("c", 2.1, [2.2, 2.3])]
    df = pd.DataFrame(rows)
    m = compute_metrics(df)
    t0 = df["arrival_s"].min()
    tokens, active = {}, {}
    for r in rows:
        for t in r["token_times_s"]:
            tokens[int(t - t0)] = tokens.get(int(t - t0), 0) + 1
        for second in range(int(r["arrival_s"] - t0), int(r["finish_s"] - t0) + 1):
            active[second] = active.get(second, 0) + 1
    assert m["peak_output_tok_s"] == max(tokens.values())
    assert m["peak_concurrency"] == max(active.values())


def test_empty_and_single_token_tables():
    m = compute_metrics(pd.DataFrame([request("x", 0.0, [0.3])]))
    assert m["completed"] == 1 and math.isnan(m["mean_tpot_ms"]) and math.isnan(m["max_itl_ms"])
    assert m["mean_ttft_ms"] == pytest.approx(300.0)
    samples = latency_samples(pd.DataFrame([request("x", 0.0, [0.3])]))
    assert samples["tpot"].size == 0 and samples["itl"].size == 0


def test_report_has_vllm_rows(table):
    m = compute_metrics(table, slos={"ttft_ms": 500})
    text = format_report(m)
    lines = text.splitlines()
    assert lines[0] == "{:=^50}".format(" Serving Benchmark Result ")
    for label in ("Successful requests:", "Benchmark duration (s):", "Total input tokens:",
                  "Total generated tokens:", "Request throughput (req/s):",
                  "Request goodput (req/s):", "Output token throughput (tok/s):",
                  "Peak output token throughput (tok/s):", "Peak concurrent requests:",
                  "Total token throughput (tok/s):", "Mean TTFT (ms):", "Median TTFT (ms):",
                  "P99 TTFT (ms):", "Mean TPOT (ms):", "P99 ITL (ms):", "Mean E2EL (ms):"):
        assert any(line.startswith(label) for line in lines), label
    row = next(line for line in lines if line.startswith("Mean TTFT (ms):"))
    assert float(row[40:]) == pytest.approx(m["mean_ttft_ms"], abs=0.006)
    row = next(line for line in lines if line.startswith("Successful requests:"))
    assert int(row[40:]) == 3


def test_percent_error_is_signed_and_relative_to_the_measurement():
    assert percent_error(100.0, 110.0) == pytest.approx(10.0)      # (sim - real) / real
    assert percent_error(100.0, 90.0) == pytest.approx(-10.0)
    assert percent_error(0, 0) == 0.0 and percent_error(0, 1) == math.inf
    assert math.isnan(percent_error(None, 1.0)) and math.isnan(percent_error(math.nan, 1.0))
    table = compare_metrics({"mean_ttft_ms": 50.0, "completed": 10},
                            {"mean_ttft_ms": 40.0, "completed": 10})
    row = table.set_index("metric").loc["mean_ttft_ms"]
    assert (row["real"], row["sim"], row["error_pct"]) == (50.0, 40.0, pytest.approx(-20.0))
    assert list(table["metric"]) == ["completed", "mean_ttft_ms"]


# ---- result directories -----------------------------------------------------------
def write_run(path: Path, config: dict, requests: pd.DataFrame, slos=None, mode="sim", run=None):
    path.mkdir(parents=True)
    requests.to_parquet(path / "requests.parquet", index=False)
    steps = pd.DataFrame({"start_s": [0.0, 0.1, 0.2], "duration_s": [0.1, 0.1, 0.1],
                          "num_seqs": [1, 2, 1], "kv_usage": [0.1, 0.2, 0.1], "replica": 0,
                          "num_batched_tokens": [10, 2, 1], "num_prefill_tokens": [10, 0, 0]})
    steps.to_parquet(path / "steps.parquet", index=False)
    summary = {"config": config, "metrics": compute_metrics(requests, slos=slos),
               "versions": {}, "gpu": None, "mode": mode, **({"run": run} if run else {})}
    (path / "summary.json").write_text(json.dumps(summary, allow_nan=True))


def scaled(table: pd.DataFrame, factor: float) -> pd.DataFrame:
    """The same requests with every latency stretched by `factor`."""
    out = table.copy()
    for column in ("first_scheduled_s", "first_token_s", "finish_s"):
        out[column] = out["arrival_s"] + (out[column] - out["arrival_s"]) * factor
    out["token_times_s"] = [[a + (t - a) * factor for t in times]
                            for a, times in zip(out["arrival_s"], out["token_times_s"])]
    return out


@pytest.fixture
def sweep(tmp_path, table):
    """A 2 x 2 sweep (block_size x max_num_seqs) where latency grows with both."""
    root = tmp_path / "sweep"
    job = 0
    for block_size in (16, 32):
        for max_num_seqs in (64, 128):
            config = {"seed": 0, "cache": {"block_size": block_size},
                      "scheduler": {"max_num_seqs": max_num_seqs, "policy": "chunked"}}
            factor = block_size / 16 * max_num_seqs / 64
            write_run(root / str(job), config, scaled(table, factor))
            job += 1
    return root


def test_find_runs_and_sweep_table(sweep):
    runs = find_runs(sweep)
    assert [r.name for r in runs] == ["0", "1", "2", "3"]
    assert varying_keys(runs) == ["cache.block_size", "scheduler.max_num_seqs"]
    table = sweep_table(runs)
    assert list(table.columns[:3]) == ["run", "cache.block_size", "scheduler.max_num_seqs"]
    assert list(table["cache.block_size"]) == [16, 16, 32, 32]
    ttft = table.set_index(["cache.block_size", "scheduler.max_num_seqs"])["median_ttft_ms"]
    assert ttft[(32, 128)] == pytest.approx(4 * ttft[(16, 64)])


def test_find_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_runs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run"):
        find_runs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="summary.json"):
        load_run(tmp_path / "empty")


def test_capacity_is_highest_rate_before_slo_attainment_drops():
    table = pd.DataFrame({"trace.request_rate": [8.0, 2.0, 4.0, 16.0, 32.0],
                          "slo_attainment": [0.91, 1.0, 0.97, 0.5, 0.95]})
    assert capacity(table) == 8.0           # 32 meets it again, but 16 did not
    assert capacity(table, min_attainment=0.95) == 4.0
    assert math.isnan(capacity(table, min_attainment=1.01))
    with pytest.raises(ValueError, match="slo_attainment"):
        capacity(table.drop(columns="slo_attainment"))


def test_figures_are_written(tmp_path, table, sweep):
    runs = find_runs(sweep)
    sweep_t = sweep_table(runs)
    figures = {"cdf": plots.latency_cdfs({"a": table, "b": scaled(table, 2)}),
               "timeline": plots.timeline(runs[0].steps()),
               "heatmap": plots.heatmap(sweep_t, "cache.block_size", "scheduler.max_num_seqs",
                                        "p99_ttft_ms")}
    load = pd.DataFrame({"trace.request_rate": [1, 2, 4], "median_ttft_ms": [1, 2, 9],
                         "p99_ttft_ms": [2, 5, 30], "median_tpot_ms": [1, 1, 2],
                         "p99_tpot_ms": [2, 2, 4], "request_throughput": [1, 2, 3]})
    figures["load"] = plots.latency_vs_load(load)
    for name, fig in figures.items():
        path = plots.save(fig, tmp_path / "png" / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # the heatmap shows one cell per (block_size, max_num_seqs) pair
    assert figures["heatmap"].axes[0].images[0].get_array().shape == (2, 2)


def test_series_styles_are_distinct_for_many_series():
    styles = [plots.series_style(i) for i in range(200)]
    keys = {(s["color"], s["linestyle"], s["marker"]) for s in styles}
    assert len(keys) == 200
    fig = plots.latency_cdfs({f"run {i}": scaled_table(i) for i in range(12)})
    lines = fig.axes[0].get_lines()
    assert len({(tuple(l.get_color()), l.get_linestyle()) for l in lines}) == 12
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 12


def scaled_table(i):
    base = pd.DataFrame([request(str(j), 0.1 * j, [0.1 * j + 0.05 * (i + 1) * k
                                                   for k in range(1, 4)]) for j in range(5)])
    return base


def test_heatmap_is_labelled_and_formatted():
    table = pd.DataFrame({"cache.block_size": [16, 16, 64, 64],
                          "scheduler.max_num_seqs": [32, 256, 32, 256],
                          "p99_ttft_ms": [5380.2, 12.345, 0.01234, 99.99]})
    fig = plots.heatmap(table, "cache.block_size", "scheduler.max_num_seqs", "p99_ttft_ms")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "KV block size (tokens)"
    assert ax.get_ylabel() == "max sequences per step"
    assert ax.get_title() == "p99 TTFT (ms), lower is better"
    assert sorted(t.get_text() for t in ax.texts) == sorted(["5,380", "12.3", "0.0123", "100.0"])
    assert fig.axes[1].get_ylabel() == "p99 TTFT (ms) (log scale)"   # the colour bar too
    wide = pd.DataFrame({"a": list(range(200)) * 2, "b": [0] * 200 + [1] * 200,
                         "p99_ttft_ms": range(400)})
    width, height = plots.heatmap(wide, "a", "b", "p99_ttft_ms").get_size_inches()
    assert width <= plots.MAX_WIDTH_IN and height <= plots.MAX_HEIGHT_IN


def test_timeline_breaks_lines_across_idle_gaps_and_names_replicas():
    steps = pd.DataFrame({"start_s": [0.0, 0.01, 0.02, 5.0, 5.01, 0.0, 0.01],
                          "duration_s": [0.01] * 7, "num_seqs": [1, 2, 3, 1, 2, 4, 4],
                          "kv_usage": [0.1] * 7, "replica": [0, 0, 0, 0, 0, 1, 1]})
    fig = plots.timeline(steps)
    lines = fig.axes[1].get_lines()
    assert [l.get_label() for l in lines] == ["replica 0", "replica 1"]
    y = lines[0].get_ydata()
    assert np.isnan(y).sum() == 1 and list(np.asarray(y)[~np.isnan(y)]) == [1, 2, 3, 1, 2]
    assert len(fig.legends) == 1


def test_latency_vs_load_marks_slos_and_capacity():
    load = pd.DataFrame({"trace.request_rate": [1, 2, 4], "median_ttft_ms": [1, 2, 9],
                         "p99_ttft_ms": [2, 5, 30], "median_tpot_ms": [1, 1, 2],
                         "p99_tpot_ms": [2, 2, 4], "request_throughput": [1, 2, 3]})
    fig = plots.latency_vs_load(load, slos={"ttft_ms": 20, "tpot_ms": 3}, capacity=2.0)
    ttft, tpot, _ = fig.axes
    labels = [l.get_label() for l in ttft.get_lines()]
    assert "SLO 20 ms" in labels and "capacity 2 req/s" in labels
    assert "SLO 3 ms" in [l.get_label() for l in tpot.get_lines()]
    both = plots.latency_vs_load({"real": load, "sim": load.assign(p99_ttft_ms=[3, 6, 40])})
    assert {"real p99", "sim p99"} <= {l.get_label() for l in both.axes[0].get_lines()}


def test_compare_identifies_the_real_run(tmp_path, table):
    write_run(tmp_path / "sim", {}, table, mode="sim")
    write_run(tmp_path / "gpu", {}, scaled(table, 2), mode="gpu")
    sim, gpu = load_run(tmp_path / "sim"), load_run(tmp_path / "gpu")
    assert identify(sim, gpu) == (gpu, sim) and identify(gpu, sim) == (gpu, sim)


def test_compare_says_when_the_runs_split_decode_attention_by_other_rules(tmp_path, table, capsys):
    """A real run whose engine cut its decode attention by another rule than the twin priced
    (each summary's run.decode_plan) gets a note naming the fields; the same rule, or a run
    that records none, none."""
    from policy.decode_plan import DecodePlan
    ran, priced = DecodePlan(8, 132, min_tokens_per_split=64), DecodePlan(8, 132, min_tokens_per_split=128)
    cases = {"other": (ran, priced), "same": (ran, ran), "unrecorded": (ran, None)}
    for name, (a, b) in cases.items():
        write_run(tmp_path / name / "gpu", {}, table, mode="gpu", run={"decode_plan": a.describe()})
        write_run(tmp_path / name / "sim", {}, table, mode="sim", run={"decode_plan": b and b.describe()})
        assert analysis_main(["--compare", str(tmp_path / name / "gpu"), str(tmp_path / name / "sim"),
                              "--out", str(tmp_path / name / "out")]) == 0
        printed = capsys.readouterr().out
        if name == "other":
            assert "split rule differs (min_tokens_per_split 64 ran, 128 priced)" in printed
            assert "engine.kernel_plan=<the calibration>" in printed
        else:
            assert "split rule differs" not in printed


def test_compare_two_load_sweeps(tmp_path, table, capsys):
    for name, factor in (("real", 1.0), ("sim", 1.25)):
        for job, rate in enumerate((1.0, 2.0)):
            write_run(tmp_path / name / str(job), {"trace": {"request_rate": rate}},
                      scaled(table, factor * rate), mode="gpu" if name == "real" else "sim")
    assert analysis_main(["--compare", str(tmp_path / "sim"), str(tmp_path / "real"),
                          "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\s+1\.0 .*\+25\.0%", printed, re.M)       # p50 TTFT 1.25x
    assert (tmp_path / "out" / "compare_latency_vs_load.png").is_file()


def test_cli_on_sweep_single_run_and_compare(tmp_path, sweep, capsys):
    out = tmp_path / "figs"
    assert analysis_main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cache.block_size" in printed and "scheduler.max_num_seqs" in printed
    for name in ("sweep.csv", "cdfs.png", "heatmap_p99_ttft_ms.png",
                 "heatmap_output_throughput.png"):
        assert (out / name).is_file(), name
    assert analysis_main([str(sweep / "0"), "--out", str(out / "one")]) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    assert (out / "one" / "cdf.png").is_file() and (out / "one" / "timeline.png").is_file()
    assert analysis_main(["--compare", str(sweep / "0"), str(sweep / "3"),
                          "--out", str(out / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "(sim-real)/real" in printed
    # run 3's latencies are 4x run 0's: +300 % with run 0 as the reference
    assert re.search(r"median_ttft_ms .* \+300\.0%", printed)
    assert (out / "cmp" / "compare_cdfs.png").is_file()
    assert (out / "cmp" / "compare_step_time.png").is_file()
    assert analysis_main([str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_load_sweep_reports_capacity(tmp_path, table, capsys):
    for job, (rate, factor) in enumerate(((1.0, 1.0), (2.0, 1.5), (4.0, 50.0))):
        config = {"trace": {"request_rate": rate}}
        write_run(tmp_path / "load" / str(job), config, scaled(table, factor),
                  slos={"ttft_ms": 600})
    assert analysis_main([str(tmp_path / "load")]) == 0
    printed = capsys.readouterr().out
    assert "capacity: 2 req/s" in printed
    assert (tmp_path / "load" / "analysis" / "latency_vs_load.png").is_file()


def test_analysis_imports_no_executor():
    code = ("import sys, analysis.metrics, analysis.plots, analysis.compare, analysis.runs, "
            "analysis.__main__; bad = [m for m in ('torch', 'simpy', 'engine', 'simulator', "
            "'experiments', 'policy') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
