"""The benchmark client against the simulated server on loopback: the run directory has the
project's schema (analysis reads and compares it), every request's lengths are the
trace's, timestamps are ordered, and refused requests count as failed."""
import json
import math

import pandas as pd
import pytest

pytest.importorskip("fastapi")

from analysis.__main__ import main as analysis_main  # noqa: E402
from analysis.compare import compare_metrics  # noqa: E402
from analysis.runs import load_run  # noqa: E402
from bench.__main__ import main, trace_config, parse_args  # noqa: E402
from experiments.results import REQUEST_COLUMNS  # noqa: E402
from server import build_app  # noqa: E402
from server.sim import SimBackend  # noqa: E402
from server.thread import serving  # noqa: E402
from traces import load_trace  # noqa: E402

TRACE = ["--trace", "synthetic", "--set", "prompt_len=48", "--set", "output_len=12",
         "--set", "length_dist=uniform", "--set", "prompt_len_range=[8,300]",
         "--set", "output_len_range=[1,20]", "--num-prompts", "40", "--request-rate", "200"]


@pytest.fixture(scope="module")
def url():
    backend = SimBackend("qwen3-0.6b", "h200", num_gpu_blocks=512, max_model_len=256)
    with serving(build_app(backend, "sim-qwen")) as url:
        yield url


def test_replay_writes_the_run_schema(url, tmp_path):
    out = tmp_path / "run"
    metrics = main(["--url", url, *TRACE, "--out", str(out), "--disable-tqdm",
                    "--goodput", "ttft:10000", "--num-warmups", "2"])
    run = load_run(out)
    assert run.summary["mode"] == "http" and run.config["bench"]["model"] == "sim-qwen"
    requests = run.requests()
    assert list(requests.columns)[:len(REQUEST_COLUMNS)] == list(REQUEST_COLUMNS)
    trace = load_trace(trace_config(parse_args(["--url", url, *TRACE, "--out", "x"])))
    fits = trace[trace.prompt_len + trace.output_len <= 256]
    refused = trace[trace.prompt_len + trace.output_len > 256]
    assert len(refused) > 0 and len(fits) > 0          # the trace has both kinds
    done = requests[requests.finish_reason == "length"]
    assert sorted(done.request_id) == sorted(fits.request_id)
    merged = done.merge(fits, on="request_id", suffixes=("", "_trace"))
    assert (merged.output_len == merged.output_len_trace).all()
    assert (merged.prompt_len == merged.prompt_len_trace).all()
    for row in done.itertuples():
        times = list(row.token_times_s)
        assert row.arrival_s <= row.first_token_s == times[0] <= times[-1] == row.finish_s
    failed = requests[requests.finish_reason == "error"]
    assert set(failed.request_id) == set(refused.request_id)
    assert failed.error.str.contains("HTTP 400").all() and failed.finish_s.isna().all()
    assert metrics["completed"] == len(fits) and metrics["failed"] == len(refused)
    assert metrics["total_output_tokens"] == fits.output_len.sum()
    assert metrics["request_goodput"] > 0 and 0 < metrics["mean_tpot_ms"] < math.inf
    table = compare_metrics(run.metrics, json.loads((out / "summary.json").read_text())["metrics"])
    assert (table.error_pct.dropna() == 0).all()
    assert pd.read_parquet(out / "steps.parquet").empty
    server = run.summary["server_metrics"]          # what the server's /metrics saw meanwhile
    assert server["time_to_first_token_count"] == len(fits)
    assert server["generation_tokens"] == fits.output_len.sum()
    assert server["prompt_tokens"] == fits.prompt_len.sum()
    assert 0 < server["mean_time_to_first_token_ms"] <= metrics["mean_ttft_ms"]
    analysis_main([str(out), "--out", str(tmp_path / "figures")])          # one run's report
    analysis_main(["--compare", str(out), str(out), "--out", str(tmp_path / "figures")])
    assert (tmp_path / "figures" / "compare_cdfs.png").is_file()


def test_bad_arguments_are_one_line_errors(url, tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown trace"):
        main(["--url", url, "--trace", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown trace field"):
        main(["--url", url, "--trace", "synthetic", "--set", "colour=red", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="goodput"):
        main(["--url", url, *TRACE, "--goodput", "speed:3", "--out", str(tmp_path)])


def test_reset_prefix_cache_makes_a_rerun_start_cold(tmp_path):
    """The same trace replayed twice on one server: the second run finds every prompt
    cached (its numbers are not an offline replay's) unless --reset-prefix-cache empties
    the cache after the warm-up, as run.py resets its engine."""
    backend = SimBackend("qwen3-0.6b", "h200", num_gpu_blocks=512, max_model_len=512)
    trace = [*TRACE[:-4], "--num-prompts", "10", "--request-rate", "200", "--disable-tqdm"]
    with serving(build_app(backend, "sim-qwen")) as url:
        runs = {}
        for name, extra in (("first", []), ("again", []), ("reset", ["--reset-prefix-cache"])):
            main(["--url", url, *trace, "--out", str(tmp_path / name), *extra])
            runs[name] = load_run(tmp_path / name)
    hits = {k: r.summary["server_metrics"]["prefix_cache_hits"] for k, r in runs.items()}
    assert hits["first"] == 0 and hits["again"] > 0 and hits["reset"] == 0, hits
    assert runs["again"].metrics["prefix_cache_hit_rate"] > 0.5
    assert runs["reset"].metrics["prefix_cache_hit_rate"] == 0
    assert runs["reset"].config["bench"]["reset_prefix_cache"] is True
