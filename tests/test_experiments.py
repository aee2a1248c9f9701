"""The experiment pipeline end to end: Hydra config -> trace -> executor -> result files.

In-process runs use Hydra's compose API (fast); `run.py` itself is run as a subprocess for
what only the command line shows: exit codes, multirun with the joblib launcher, wandb."""
import dataclasses
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from analysis.__main__ import main as analysis_main
from analysis.compare import compare_runs
from analysis.metrics import compute_metrics
from analysis.runs import load_run
from experiments.config import build, register_configs
from experiments.replay import run
from experiments.results import REQUEST_COLUMNS
from simulator.cost_model import FittedCostModel
from simulator.hardware import SERVING_HOST_TERMS, HostCosts
from traces import load_trace

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SMALL = ["logger=none", "progress=false", "trace.num_requests=40"]
STEP_COLUMNS = ("start_s", "duration_s", "num_seqs", "num_batched_tokens", "num_prefill_tokens",
                "num_decode_seqs", "num_sampled", "decode_context_tokens",
                "prefill_context_tokens", "num_preempted", "prefix_hit_tokens",
                "kv_blocks_used", "replica", "step", "kv_usage")


def compose_config(overrides=(), hydra=False):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def replay(run_dir, overrides=()):
    metrics = run(compose_config(SMALL + list(overrides)), run_dir)
    return metrics, pd.read_parquet(run_dir / "requests.parquet")


def run_py(*args, cwd=REPO, timeout=300):
    env = dict(os.environ, WANDB_SILENT="true", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_run_dir(run_dir: Path, cfg) -> pd.DataFrame:
    """Result files exist with the schema, every trace request appears once, timestamps are
    ordered, and summary.json's metrics are what requests.parquet gives."""
    requests = pd.read_parquet(run_dir / "requests.parquet")
    steps = pd.read_parquet(run_dir / "steps.parquet")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(REQUEST_COLUMNS) | {"ttft_s", "tpot_s", "e2el_s"} <= set(requests.columns)
    assert set(STEP_COLUMNS) <= set(steps.columns)
    assert {"config", "metrics", "versions", "gpu", "mode"} <= set(summary)
    assert summary["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))

    trace = load_trace(build(cfg).trace).set_index("request_id")
    assert requests["request_id"].is_unique
    assert sorted(requests["request_id"]) == sorted(trace.index)
    rows = requests.set_index("request_id")
    assert (rows["prompt_len"] == trace.loc[rows.index, "prompt_len"]).all()
    assert (rows["output_len"] == trace.loc[rows.index, "output_len"]).all()   # ignore_eos
    # (the engine's clock shifts arrivals by its start time and back: equal up to rounding)
    assert rows["arrival_s"].to_numpy() == pytest.approx(
        trace.loc[rows.index, "arrival_s"].to_numpy(), abs=1e-9)
    assert (requests["finish_reason"] == "length").all()

    assert (requests["arrival_s"] <= requests["first_scheduled_s"]).all()
    assert (requests["first_scheduled_s"] <= requests["first_token_s"]).all()
    assert (requests["first_token_s"] <= requests["finish_s"]).all()
    for times, first, last, n in zip(requests["token_times_s"], requests["first_token_s"],
                                     requests["finish_s"], requests["output_len"]):
        assert len(times) == n and times[0] == first and times[-1] == last
        assert all(a <= b for a, b in zip(times, times[1:]))
    for _, replica_steps in steps.groupby("replica"):
        assert replica_steps["start_s"].is_monotonic_increasing
    assert steps["kv_usage"].between(0, 1).all()
    assert steps["num_sampled"].sum() == requests["output_len"].sum()   # one token per sample

    recomputed = compute_metrics(requests, duration_s=summary["metrics"]["duration_s"],
                                 slos=summary["config"]["slo"])
    for key, value in summary["metrics"].items():
        assert recomputed[key] == pytest.approx(value, nan_ok=True) or value is None, key
    assert summary["metrics"]["completed"] == len(trace)
    return requests


# ---- in-process -------------------------------------------------------------------
def test_sim_replay_writes_consistent_results(tmp_path):
    cfg = compose_config(SMALL)
    metrics = run(cfg, tmp_path)
    check_run_dir(tmp_path, cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "sim" and summary["gpu"] is None
    assert summary["config"]["cache"]["block_size"] == 16
    assert summary["run"]["num_blocks"] > 0
    assert metrics["completed"] == 40
    # the summary says what produced the numbers and under what load
    assert summary["backend"].startswith("simulator: roofline cost model, qwen3-0.6b on h100")
    assert summary["load"]["request_rate"] == cfg.trace.request_rate
    assert f"poisson arrivals at {cfg.trace.request_rate:g} req/s" in summary["load"]["text"]


def test_summary_names_a_fitted_calibration_and_trace_timestamps(tmp_path, stand_in_calibration):
    path = stand_in_calibration
    run(compose_config(SMALL + ["cost_model=fitted", f"cost_model.path={path}",
                                "trace=azure_conv", "trace.time_scale=0.5"]), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert str(path) in summary["backend"] and "'stand-in GPU'" in summary["backend"]
    assert "EXAMPLE" not in summary["backend"]
    assert summary["load"]["arrival"] == "trace" and summary["load"]["time_scale"] == 0.5
    assert summary["load"]["request_rate"] is None


def test_recorded_config_reads_a_runs_summary_back(tmp_path):
    """A summary's config rebuilds the run's config: JSON stores a roofline_exponent of inf
    (the max of the two terms) as null, read back as inf; an optional field's null stays None."""
    from experiments.config import recorded_config
    cfg = compose_config(SMALL + ["hardware.roofline_exponent=inf", "hardware.expert_flops_efficiency=null"])
    run(cfg, tmp_path)
    config = json.loads((tmp_path / "summary.json").read_text())["config"]
    assert config["hardware"]["roofline_exponent"] is None
    rc, original = build(recorded_config(config)), build(cfg)
    assert rc.hardware == original.hardware and rc.hardware.roofline_exponent == float("inf")
    assert rc.scheduler == original.scheduler and rc.trace == original.trace


def test_compare_prices_each_real_step_with_the_simulators_cost_model(tmp_path, stand_in_calibration, capsys):
    """`analysis --compare` prices every step of the real run with the cost model the simulated
    run used: a run made with that very model, taken as the measurement, is priced at its own
    device times step for step; one made with another model is not; a replayed simulation
    has no model to price with and the figure falls back to the two runs' steps."""
    from analysis.compare import priced_steps
    from analysis.runs import load_run
    fitted = SMALL + ["cost_model=fitted", f"cost_model.path={stand_in_calibration}"]
    run(compose_config(fitted), tmp_path / "fitted")
    run(compose_config(SMALL), tmp_path / "roofline")
    for name in ("fitted", "roofline"):     # stand-ins for engine runs
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        (tmp_path / name / "summary.json").write_text(json.dumps({**summary, "mode": "gpu"}))
    sim = load_run(tmp_path / "fitted")
    steps, model = priced_steps(load_run(tmp_path / "fitted"), sim)
    assert str(stand_in_calibration) in model and len(steps) > 40
    assert (steps["pred_s"] - steps["device_s"]).abs().max() < 1e-12 * steps["device_s"].max()
    steps, _ = priced_steps(load_run(tmp_path / "roofline"), sim)
    assert (steps["pred_s"] - steps["device_s"]).abs().max() > 0.01 * steps["device_s"].max()
    assert analysis_main(["--compare", str(tmp_path / "roofline"), str(tmp_path / "fitted"),
                          "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "priced by the simulator's cost model, fitted" in printed and "decode-only" in printed
    assert (tmp_path / "out" / "compare_step_time.png").is_file()
    run(compose_config(SMALL + ["cost_model=replay", f"cost_model.path={tmp_path / 'roofline' / 'steps.parquet'}"]),
        tmp_path / "replayed")
    steps, why = priced_steps(load_run(tmp_path / "roofline"), load_run(tmp_path / "replayed"))
    assert steps is None and "'replay'" in why


def test_fitted_cost_model_needs_a_named_calibration():
    with pytest.raises(ValueError, match="cost_model.kind='fitted' needs cost_model.path"):
        build(compose_config(SMALL + ["cost_model=fitted"]))


def test_same_seed_same_results_other_seed_differs(tmp_path):
    _, a = replay(tmp_path / "a", ["seed=3"])
    _, b = replay(tmp_path / "b", ["seed=3"])
    _, c = replay(tmp_path / "c", ["seed=4"])
    pd.testing.assert_frame_equal(a, b)
    assert not a["arrival_s"].equals(c["arrival_s"])


def test_slos_add_goodput(tmp_path):
    metrics, _ = replay(tmp_path, ["slo.ttft_ms=1e6", "slo.tpot_ms=1e6"])
    assert metrics["slo_attainment"] == 1.0
    assert metrics["request_goodput"] == pytest.approx(metrics["request_throughput"])


def test_prefill_first_and_replicas(tmp_path):
    cfg = compose_config(SMALL + ["scheduler=prefill_first", "cluster.num_replicas=2",
                                  "cluster.router=least_outstanding"])
    run(cfg, tmp_path)
    requests = check_run_dir(tmp_path, cfg)
    assert set(requests["replica"]) == {0, 1}


def test_replaying_a_runs_step_times_reproduces_it(tmp_path, caplog):
    """The sim-vs-real loop on the simulator alone: fed run A's recorded steps
    (cost_model=replay, strict), a new run schedules the same steps at the same times, so
    every request's timestamps and every compared metric match, and the run says so."""
    caplog.set_level(logging.INFO, logger="experiments.replay")
    _, a = replay(tmp_path / "a", [])
    _, b = replay(tmp_path / "b", ["cost_model=replay",
                                   f"cost_model.path={tmp_path / 'a' / 'steps.parquet'}"])
    pd.testing.assert_frame_equal(a, b)
    n = len(pd.read_parquet(tmp_path / "a" / "steps.parquet"))
    assert f"{n}/{n} steps identical, {len(a)}/{len(a)} requests with identical timestamps" in caplog.text
    eq = json.loads((tmp_path / "b" / "summary.json").read_text())["equivalence"]
    assert eq["steps_identical"] == eq["steps_recorded"] == n and eq["first_differing_request"] is None
    table = compare_runs(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    assert len(table) > 20 and (table["error_pct"].fillna(0) == 0).all()


TRACE_OPTIONS = sorted(p.stem for p in (CONF / "trace").glob("*.yaml"))


@pytest.mark.parametrize("trace", TRACE_OPTIONS)
def test_every_trace_option_replays(tmp_path, trace):
    cfg = compose_config(["logger=none", "progress=false", f"trace={trace}",
                          "trace.num_requests=5"])
    assert build(cfg).trace.name == trace
    run(cfg, tmp_path)
    check_run_dir(tmp_path, cfg)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")
                                               if "MULTIRUN" in p.read_text()))
def test_experiment_sweeps_name_real_keys(experiment):
    cfg = compose_config([f"experiment={experiment}"], hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params, experiment
    for key, values in params.items():
        assert OmegaConf.select(cfg, key) is not None, f"{experiment}: no config key {key}"
        first = str(values).split(",")[0]
        build(compose_config([f"experiment={experiment}", f"{key}={first}"]))


SWEEPS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")
                if "sweeper" in p.read_text())
OUTCOME = ("request_throughput", "p99_ttft_ms", "p99_tpot_ms", "num_preemptions",
           "prefix_cache_hit_rate")


@pytest.mark.parametrize("experiment", SWEEPS)
def test_every_shipped_sweep_axis_changes_the_results(tmp_path, experiment):
    """A sweep whose axis changes nothing tells its user nothing (or that the override was
    ignored). For each axis, its lowest and highest values, the other axes at their first
    value, must give different headline metrics (on a shortened trace)."""
    params = compose_config([f"experiment={experiment}"], hydra=True).hydra.sweeper.params
    axes = {key: str(values).split(",") for key, values in params.items()}
    base = [f"{key}={values[0]}" for key, values in axes.items()]
    num = compose_config([f"experiment={experiment}"]).trace.num_requests
    short = [f"experiment={experiment}", "logger=none", "progress=false",
             f"trace.num_requests={min(num or 1000, 300)}"]
    for key, values in axes.items():
        outcomes = []
        for value in (values[0], values[-1]):
            overrides = [o for o in base if not o.startswith(f"{key}=")] + [f"{key}={value}"]
            run_dir = tmp_path / f"{key}={value}"
            metrics = run(compose_config(short + overrides), run_dir)
            outcomes.append(tuple(round(metrics[m], 6) for m in OUTCOME))
        assert outcomes[0] != outcomes[1], f"{experiment}: {key} {values[0]} vs {values[-1]}"


@pytest.mark.parametrize("override, message", [
    ("cache.block_size=0", "cache.block_size must be a positive integer"),
    ("scheduler.policy=fifo", "scheduler.policy must be one of"),
    ("scheduler.max_num_seqs=0", "scheduler.max_num_seqs must be a positive integer"),
    ("trace.name=nope", "trace.name must be one of"),
    ("trace.num_requests=0", "trace.num_requests must be a positive integer"),
    ("cluster.num_replicas=0", "cluster.num_replicas must be an integer >= 1"),
    ("logger.kind=tensorboard", "logger.kind must be one of"),
    ("mode=gpu cluster.num_replicas=2", "mode=gpu runs one replica"),
    ("cache.gpu_memory_utilization=1.5", "cache.gpu_memory_utilization must be in (0, 1]"),
    ("engine.pdl_max_tokens=-1", "engine.pdl_max_tokens must be an integer >= 0"),
    ("calibrate.kv_layout=random", "calibrate.kv_layout must be contiguous or scattered"),
    ("calibrate.token_ids=ones", "calibrate.token_ids must be zero or random"),
    ("calibrate.block_cost_layout=random", "calibrate.block_cost_layout must be profiled, contiguous or scattered"),
    ("calibrate.kv_cache_init=ones", "calibrate.kv_cache_init must be written, random or zeros"),
])
def test_bad_values_fail_with_the_field_named(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(compose_config(override.split()))


def test_fitted_without_a_calibration_fails_clearly():
    with pytest.raises(ValueError, match="cost_model.kind='fitted' needs cost_model.path.*experiments.calibrate"):
        build(compose_config(["cost_model=fitted"]))


def test_bad_types_and_unknown_options_fail_at_compose():
    from hydra.errors import ConfigCompositionException, MissingConfigException
    with pytest.raises(ConfigCompositionException, match="cache.block_size"):
        compose_config(["cache.block_size=abc"])
    with pytest.raises(MissingConfigException, match="trace/nope"):
        compose_config(["trace=nope"])
    with pytest.raises(ConfigCompositionException, match="no_such_field"):
        compose_config(["scheduler.no_such_field=1"])


def test_request_that_can_never_run_fails_before_starting(tmp_path):
    cfg = compose_config(SMALL + ["trace.max_total_len=null", "scheduler.max_model_len=1024",
                                  "scheduler.max_num_batched_tokens=1024"])
    with pytest.raises(ValueError, match=r"exceeds max_model_len=1024.*trace.max_total_len=1024"):
        run(cfg, tmp_path)
    assert not (tmp_path / "requests.parquet").exists()
    cfg = compose_config(SMALL + ["cache.num_blocks=8"])
    with pytest.raises(ValueError, match=r"whole pool has 8.*trace.max_total_len=128"):
        run(cfg, tmp_path)


# ---- run.py as a command ----------------------------------------------------------
def test_run_py_sim_and_wandb_offline(tmp_path):
    result = run_py(*SMALL[1:], "logger=wandb", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Serving Benchmark Result" in result.stdout
    assert "Mean TTFT (ms):" in result.stdout
    assert "backend: simulator: roofline cost model" in result.stdout
    log = (tmp_path / "run.log").read_text()     # the run's log, through logging
    assert "Mean TTFT (ms):" in log and "load: sharegpt, poisson arrivals" in log
    check_run_dir(tmp_path, compose_config(SMALL))
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert (tmp_path / "cdf.png").is_file()


def test_multirun_sweep_then_analysis(tmp_path):
    sweep_dir = tmp_path / "sweep"
    with_progress = [a for a in SMALL if a != "progress=false"]   # jobs must turn it off
    result = run_py("-m", *with_progress, "trace.num_requests=20", "cache.block_size=16,32",
                    "scheduler.max_num_seqs=32,64", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    # one line per job (no interleaved reports or progress bars), then one table
    assert "Serving Benchmark Result" not in result.stdout and "%|" not in result.stderr
    assert sorted(re.findall(r"^job (\d) \[", result.stdout, re.M)) == ["0", "1", "2", "3"]
    table = result.stdout.split("sweep: 4 jobs in")[1].splitlines()[1:6]
    assert table[0].split()[:4] == ["job", "cache.block_size", "scheduler.max_num_seqs", "status"]
    assert [row.split()[:4] for row in table[1:]] == [
        ["0", "16", "32", "ok"], ["1", "16", "64", "ok"], ["2", "32", "32", "ok"],
        ["3", "32", "64", "ok"]]
    run_dirs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    assert [p.name for p in run_dirs] == ["0", "1", "2", "3"]
    seen = set()
    for run_dir in run_dirs:
        config = json.loads((run_dir / "summary.json").read_text())["config"]
        seen.add((config["cache"]["block_size"], config["scheduler"]["max_num_seqs"]))
        check_run_dir(run_dir, compose_config(
            SMALL + ["trace.num_requests=20", f"cache.block_size={config['cache']['block_size']}",
                     f"scheduler.max_num_seqs={config['scheduler']['max_num_seqs']}"]))
    assert seen == {(16, 32), (16, 64), (32, 32), (32, 64)}

    out = tmp_path / "analysis"
    assert analysis_main([str(sweep_dir), "--out", str(out)]) == 0
    assert (out / "heatmap_p99_ttft_ms.png").is_file() and (out / "sweep.csv").is_file()
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 4 and {"cache.block_size", "scheduler.max_num_seqs"} <= set(table.columns)
    assert analysis_main(["--compare", str(run_dirs[0]), str(run_dirs[3]), "--out", str(out)]) == 0
    assert (out / "compare_cdfs.png").is_file()


def test_run_py_bad_value_exits_nonzero_with_message(tmp_path):
    run_dir = tmp_path / "outputs" / "run"
    result = run_py(*SMALL, "cache.block_size=0", cwd=tmp_path)    # Hydra's outputs/<date>/<time>
    assert result.returncode == 1
    # one line, no traceback, and no folder left behind by the failed run
    assert result.stderr == "error: cache.block_size must be a positive integer, got 0\n"
    assert not (tmp_path / "outputs").exists()
    full = subprocess.run([sys.executable, str(REPO / "run.py"), *SMALL, "cache.block_size=0",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                          env=dict(os.environ, TWINSERVE_TRACEBACK="1"), timeout=300)
    assert full.returncode == 1 and "Traceback" in full.stderr
    result = run_py(*SMALL, "trace=sharegpt_tokens", "scheduler.max_model_len=512",
                    f"hydra.run.dir={run_dir}")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "no request left: all 300 rows were dropped" in result.stderr
    result = run_py(*SMALL, "trace=nope", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "Could not find 'trace/nope'" in result.stderr


def test_failed_sweep_job_is_one_line_and_the_sweep_exits_nonzero(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_py("-m", *SMALL, "trace.num_requests=10", "scheduler.max_num_seqs=8,0",
                    f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 1
    assert re.search(r"^job 1 \[.*\]: failed: scheduler.max_num_seqs must be a positive "
                     "integer, got 0$", result.stdout, re.M)
    assert "Traceback" not in result.stdout + result.stderr
    assert "error: 1 of 2 jobs failed" in result.stderr
    assert (sweep_dir / "0" / "summary.json").is_file()
    assert "failed: scheduler.max_num_seqs" in (sweep_dir / "1" / "run.log").read_text()


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch
    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda_available(), reason="this machine has a GPU: mode=gpu would run")
def test_gpu_mode_without_gpu_fails_clearly(tmp_path):
    result = run_py(*SMALL, "mode=gpu", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "mode=gpu needs the engine extra: pip install -e .[engine] and a GPU" in result.stderr
    assert not (tmp_path / "requests.parquet").exists()


def test_random_checkpoint_is_written_once_per_architecture(tmp_path, monkeypatch):
    checkpoint = pytest.importorskip("engine.checkpoint")
    from experiments import replay as replay_module
    monkeypatch.setattr(replay_module, "CHECKPOINT_DIR", tmp_path)
    rc = dataclasses.replace(build(compose_config(["mode=gpu", "engine.dtype=float32"])),
                             model_name="tiny", hf_config=checkpoint.tiny_config("qwen3"))
    path = Path(replay_module.model_path(rc))
    assert path == tmp_path / "tiny-float32" and (path / "model.safetensors").is_file()
    written = (path / "model.safetensors").stat().st_mtime_ns
    replay_module.model_path(rc)
    assert (path / "model.safetensors").stat().st_mtime_ns == written      # reused
    wider = dataclasses.replace(rc, hf_config=checkpoint.tiny_config("qwen3", hidden_size=128))
    replay_module.model_path(wider)
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 128   # rewritten
    explicit = dataclasses.replace(rc, engine=dataclasses.replace(rc.engine, model_path="/x"))
    assert replay_module.model_path(explicit) == "/x"


def test_gpu_mode_replays_on_cpu_with_a_tiny_model(tmp_path, monkeypatch):
    """The engine's online replay path, on the CPU: same result files as the simulator; the
    timed steps run with the start-up objects frozen out of the garbage collector (no full
    collection charged to the trace), and the freeze is undone afterwards."""
    import gc
    pytest.importorskip("torch")
    checkpoint = pytest.importorskip("engine.checkpoint")
    from engine import LLMEngine
    frozen, step = [], LLMEngine.step
    monkeypatch.setattr(LLMEngine, "step",
                        lambda self, *a, **k: frozen.append(gc.get_freeze_count()) or step(self, *a, **k))
    before = gc.get_freeze_count()
    model_dir = checkpoint.write_random_checkpoint(checkpoint.tiny_config("qwen3"),
                                                   tmp_path / "tiny", dtype="float32")
    cfg = compose_config(["mode=gpu", "engine.device=cpu", f"engine.model_path={model_dir}",
                          "logger=none", "progress=false", "trace=synthetic",
                          "trace.num_requests=8", "trace.prompt_len=24", "trace.output_len=4",
                          "trace.request_rate=50", "scheduler.max_model_len=256",
                          "scheduler.max_num_batched_tokens=256", "cache.num_blocks=64"])
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    check_run_dir(run_dir, cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "gpu" and summary["run"]["num_blocks"] == 64
    assert frozen[0] == before and frozen[-1] > before   # warm-up unfrozen, replay frozen
    assert gc.get_freeze_count() == before


@pytest.mark.parametrize("policy,async_scheduling", [("chunked", True), ("prefill_first", True),
                                                     ("chunked", False), ("prefill_first", False)])
def test_policy_equivalence_engine_then_simulator(tmp_path, policy, async_scheduling, caplog):
    """DESIGN's promise: fed the engine's recorded steps, the simulator reproduces the
    engine's schedule step for step and every request's timestamps. The engine (on the
    CPU, tiny model) replays timed arrivals (Poisson, fast enough to land while steps
    run) with shared prefixes (prefix-cache hits), chunked prefill and a pool small enough
    to preempt, with and without asynchronous scheduling; the simulator then replays the
    same trace with cost_model=replay on the engine's steps.parquet, strict: it raises at
    the first step formed differently, and reports N/N steps identical."""
    pytest.importorskip("torch")
    checkpoint = pytest.importorskip("engine.checkpoint")
    model_dir = checkpoint.write_random_checkpoint(checkpoint.tiny_config("qwen3"),
                                                   tmp_path / "tiny", dtype="float32")
    common = ["logger=none", "progress=false", f"scheduler={policy}", "trace=shared_prefix",
              "trace.num_requests=24", "trace.request_rate=400", "trace.length_dist=uniform",
              "trace.prompt_len_range=[4,40]", "trace.output_len_range=[8,24]",
              "trace.num_prefixes=2", "trace.prefix_len=16",
              "scheduler.max_model_len=96", "scheduler.max_num_batched_tokens=48",
              "scheduler.max_num_seqs=6", "cache.block_size=4", "cache.num_blocks=24",
              f"engine.async_scheduling={str(async_scheduling).lower()}"]
    real = tmp_path / "real"
    run(compose_config(common + ["mode=gpu", "engine.device=cpu",
                                 f"engine.model_path={model_dir}"]), real)
    steps = pd.read_parquet(real / "steps.parquet")
    requests = pd.read_parquet(real / "requests.parquet")
    # what this test is about actually happened on the engine
    assert steps["num_preempted"].sum() > 0, "the pool should force preemption"
    assert steps["prefix_hit_tokens"].sum() > 0, "shared prefixes should hit the cache"
    assert (requests["arrival_s"] > steps["start_s"].min()).sum() > len(requests) // 2, \
        "arrivals should land while the engine runs, not all before it starts"
    busy = steps["start_s"].to_numpy()
    assert any(((busy < a) & (a < steps["end_s"].to_numpy())).any() for a in requests["arrival_s"]), \
        "some request should arrive while a step is being formed or run"
    if async_scheduling:   # step N+1 formed before step N's tokens were received
        assert (steps["start_s"].to_numpy()[1:] < steps["tokens_s"].to_numpy()[:-1]).any()
    else:
        assert (steps["start_s"].to_numpy()[1:] >= steps["tokens_s"].to_numpy()[:-1]).all()
    sim = tmp_path / "sim"
    caplog.set_level(logging.INFO, logger="experiments.replay")
    caplog.clear()
    run(compose_config(common + ["mode=sim", "cost_model=replay",
                                 f"cost_model.path={real / 'steps.parquet'}"]), sim)
    n, m = len(steps), len(requests)
    assert f"{n}/{n} steps identical, {m}/{m} requests with identical timestamps" in caplog.text
    sim_steps = pd.read_parquet(sim / "steps.parquet")
    shape = ["num_seqs", "num_batched_tokens", "num_prefill_tokens", "num_decode_seqs", "num_sampled",
             "num_preempted", "prefix_hit_tokens", "kv_blocks_used", "start_s", "launch_s", "tokens_s",
             "end_s"]
    pd.testing.assert_frame_equal(steps[shape], sim_steps[shape])
    a = requests.set_index("request_id").sort_index()
    b = pd.read_parquet(sim / "requests.parquet").set_index("request_id").sort_index()
    columns = ["arrival_s", "first_scheduled_s", "first_token_s", "finish_s", "num_preemptions",
               "cached_prompt_tokens", "output_len", "ttft_s", "e2el_s"]
    pd.testing.assert_frame_equal(a[columns], b[columns])
    assert (a["token_times_s"].map(list) == b["token_times_s"].map(list)).all()
    # a replay under other policy settings is refused before it starts
    flipped = [o for o in common if not o.startswith("engine.async")] + [
        f"engine.async_scheduling={str(not async_scheduling).lower()}"]
    with pytest.raises(ValueError, match="recorded with async scheduling"):
        run(compose_config(flipped + ["mode=sim", "cost_model=replay",
                                      f"cost_model.path={real / 'steps.parquet'}"]), tmp_path / "x")


def test_calibrate_profiles_the_engine_and_fits_the_cost_models(tmp_path, capsys, monkeypatch):
    """`experiment=calibrate` on the CPU with a tiny model: the engine's runner is profiled
    over the grid, the fitted model and the roofline's hardware parameters are written with
    their provenance, the held-out error per step kind is printed, and the calibration then
    drives a simulated run."""
    pytest.importorskip("torch")
    checkpoint = pytest.importorskip("engine.checkpoint")
    from experiments import calibrate as calibrate_module
    from experiments.calibrate import main as calibrate_main
    model_dir = checkpoint.write_random_checkpoint(checkpoint.tiny_config("qwen3"),
                                                   tmp_path / "tiny", dtype="float32")
    out = tmp_path / "calib.json"
    # a shorter serving-loop run (its first bursts still admit 0-3 requests a turn)
    monkeypatch.setattr(calibrate_module, "SERVING_REQUESTS", 12)
    monkeypatch.setattr(calibrate_module, "SERVING_OUTPUT", 4)
    # shapes of 32 prompt tokens or more also timed cool, every other one, after 2 light steps
    monkeypatch.setattr(calibrate_module, "COOL_MIN_PROMPT_TOKENS", 32)
    monkeypatch.setattr(calibrate_module, "COOL_EVERY", 2)
    monkeypatch.setattr(calibrate_module, "COOL_STEPS", 2)
    monkeypatch.setattr(calibrate_module, "COLD_IDLE_S", 0.001)     # (every eighth shape after 1 ms idle)
    calibrate_main(["engine.device=cpu", f"engine.model_path={model_dir}", "engine.dtype=float32",
                    "scheduler.max_num_seqs=4", "scheduler.max_num_batched_tokens=64",
                    "scheduler.max_model_len=128", "cache.num_blocks=64", "calibrate.repeats=2",
                    "calibrate.clock=true", f"calibrate.out={out}"])
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    calib = json.loads(out.read_text())
    assert calib["device"].startswith("cpu") and calib["model"] == "qwen3-0.6b" and calib["tp"] == 1
    assert "experiment=calibrate" in calib["command"] and calib["engine_commit"]
    assert calib["engine"]["max_num_batched_tokens"] == 64 and calib["engine"]["cuda_graph_max_tokens"] == 0
    assert calib["profiled"]["kv_layout"] == "contiguous"    # (the default: a fresh pool's, as replays have)
    assert calib["profiled"]["token_ids"] == "random"       # (the default: as serving's prompts)
    assert calib["profiled"]["kv_cache_init"] == "written"  # (the default: the model's KV, as serving reads)
    # the clock term, where the CPU's timings gave one, loads back as the simulator prices it
    assert "clock" not in calib or FittedCostModel(calib).clock.tau_s == calib["clock"]["tau_s"]
    assert set(calib["kinds"]) == {"eager"}                  # no CUDA graphs on the CPU
    held = calib["kinds"]["eager"]["held_out"]
    assert held["n"] > 0 and held["mape"] == pytest.approx(summary["held_out_mape"]["eager"], abs=1e-4)
    assert "held-out MAPE" in printed and "eager" in printed
    profile = pd.read_parquet(summary["profile"])
    assert (profile["device_s"] > 0).all() and set(profile["split"]) == {"train", "held_out"}
    assert profile["num_batched_tokens"].max() == 64 and profile["num_decode_seqs"].max() == 4
    # every other shape of 32 prompt tokens or more timed cool too, the rest not
    heavy = profile[profile["num_prefill_tokens"] >= 32]
    timed = heavy["device_cool_s"].notna()
    assert 0 < timed.sum() < len(heavy) and (heavy.loc[timed, "device_cool_s"] > 0).all()
    assert profile.loc[profile["num_prefill_tokens"] < 32, "device_cool_s"].isna().all()
    cold = profile["device_cold_s"].notna()
    assert 0 < cold.sum() < len(profile) and (profile.loc[cold, "device_cold_s"] > 0).all()
    assert "timed cool" in printed and summary["clock_over_back_to_back"]
    # every 16th lighter shape timed right after heavy prompt steps
    light = profile[profile["num_prefill_tokens"] < 32]
    hot = light["device_hot_s"].notna()
    assert 0 < hot.sum() < len(light) and (light.loc[hot, "device_hot_s"] > 0).all()
    assert profile.loc[profile["num_prefill_tokens"] >= 32, "device_hot_s"].isna().all()
    # the timeline: every launch waited on, in order; per shape its warm-up, its idle launch
    # and the repeats back to back; the heavy steps before a hot timing are not the shape's own
    timeline = pd.read_parquet(summary["timeline"])
    assert (timeline["device_s"] > 0).all() and (timeline["gap_s"] >= 0).all()
    own = timeline[timeline["own"] & (timeline["phase"] == "back_to_back")]
    assert (own.groupby("shape").size() == 2 + 2).all() and own["shape"].nunique() == len(profile)
    for column in ("num_batched_tokens", "num_prefill_tokens", "decode_context_tokens", "prefill_attention_pairs"):
        assert (own[column].to_numpy() == profile[column].to_numpy()[own["shape"].to_numpy()]).all()
    before_hot = timeline[(timeline["phase"] == "hot") & ~timeline["own"]]
    assert len(before_hot) > 0 and (before_hot["num_prefill_tokens"] > 32).all()
    # decodes sharing a prefix were profiled (the engine read the same blocks)
    assert (profile["decode_distinct_context_tokens"] < profile["decode_context_tokens"]).any()
    # the torch backend runs no split-KV plan: no span, no plan in the file
    assert "decode_span_tokens" not in profile.columns and "decode_plan" not in calib
    hardware = Path(summary["hardware"])
    assert hardware.is_file() and "fitted on" in hardware.read_text()
    # the serving loop's host window: its steps kept, admissions of 0-3 requests timed apart
    serving = pd.read_parquet(summary["serving"])
    assert set(serving["admitted"]) == {0, 1, 2, 3} and (serving.loc[serving["admitted"] > 0, "admit_time_s"] > 0).all()
    # (which term carries a CPU window's fixed part depends on the box's load: the window of a
    # one-sequence step, as the simulator charges it, is what must come out positive)
    served = HostCosts.from_calibration(calib, "serving")
    assert calib["host_serving"]["n"] > 0 and served.before_launch(1) > 0
    assert all(calib["host_serving"][k] >= 0 for k in SERVING_HOST_TERMS)
    # re-measured alone: host_serving and its steps rewritten, the fits left as they were
    Path(summary["serving"]).unlink()
    calibrate_main(["--host-serving-only", "engine.device=cpu", f"engine.model_path={model_dir}",
                    "engine.dtype=float32", "scheduler.max_num_seqs=4", "scheduler.max_num_batched_tokens=64",
                    "scheduler.max_model_len=128", "cache.num_blocks=64", f"calibrate.out={out}"])
    again = json.loads(out.read_text())
    assert Path(summary["serving"]).is_file() and "--host-serving-only" in again["host_serving_command"]
    assert again["host_serving"] != calib["host_serving"] and again["kinds"] == calib["kinds"]
    with pytest.raises(SystemExit, match="no calibration at"):
        calibrate_main(["--host-serving-only", "engine.device=cpu", f"calibrate.out={tmp_path / 'none.json'}"])
    # the block size's cost measured on the model's own steps (experiments.block_cost): block 32
    # against the profiled 16, written into the calibration, which then prices block 32 by it
    engine_args = ["engine.device=cpu", f"engine.model_path={model_dir}", "engine.dtype=float32",
                   "scheduler.max_num_seqs=4", "scheduler.max_num_batched_tokens=64",
                   "scheduler.max_model_len=128", "cache.num_blocks=64", "calibrate.repeats=1",
                   f"calibrate.out={out}"]
    monkeypatch.setattr("experiments.block_cost.SHAPES_PER_KIND", 6)
    calibrate_main(["--block-cost", "32"] + engine_args)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    costed = json.loads(out.read_text())
    table = costed["attention_block_cost"]
    assert table and all(t["16"] == 1.0 and t["32"] > 0 for t in table.values())
    assert costed["kinds"] == again["kinds"] and "--block-cost 32" in costed["attention_block_cost_measured"]["command"]
    timed = pd.read_parquet(summary["blocks"])
    assert len(timed) == summary["shapes"] and (timed[["device_s_block16", "device_s_block32"]] > 0).all().all()
    model = FittedCostModel(costed, block_size=32)
    assert model.attn_factors == {k: t["32"] for k, t in table.items()}
    assert costed["attention_block_cost_measured"]["kv_layout"] == costed["profiled"]["kv_layout"]
    # the shapes' blocks laid out as a churned pool's, whatever the profile did
    calibrate_main(["--block-cost", "32", "calibrate.block_cost_layout=scattered"] + engine_args)
    assert json.loads(out.read_text())["attention_block_cost_measured"]["kv_layout"] == "scattered"
    capsys.readouterr()
    # the cost of a step after device idle (experiments.idle_cost), written in and priced by
    monkeypatch.setattr("experiments.idle_cost.SHAPES_PER_KIND", 2)
    monkeypatch.setattr("experiments.idle_cost.IDLES_S", (0.001, 0.004))
    before = json.loads(out.read_text())
    calibrate_main(["--idle-cost"] + engine_args)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    idled = json.loads(out.read_text())
    assert idled["idle_cost"]["idle_s"] == [0.001, 0.004] and idled["idle_cost"]["form"] in ("add", "mul")
    assert idled["attention_block_cost"] == before["attention_block_cost"]       # kept
    timed = pd.read_parquet(summary["idle"])
    assert len(timed) == summary["shapes"] * 2 * 1 and (timed["device_s"] > 0).all()
    assert FittedCostModel(idled).idle is not None
    for bad in (["--block-cost", "16"], ["--block-cost=x"]):      # the profiled size, not a list
        with pytest.raises(SystemExit, match="--block-cost"):
            calibrate_main(bad + engine_args)
    run(compose_config(SMALL + ["cost_model=fitted", f"cost_model.path={out}", "trace=synthetic",
                                "trace.prompt_len=32", "trace.output_len=8", "scheduler.max_model_len=128",
                                "scheduler.max_num_batched_tokens=64", "scheduler.max_num_seqs=4",
                                "cache.num_blocks=64"]), tmp_path / "sim")
    assert len(pd.read_parquet(tmp_path / "sim" / "steps.parquet")) > 0


# ---- the project command ----------------------------------------------------------
def twinserve(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "twinserve", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, WANDB_SILENT="true"))


def test_twinserve_command_dispatches(tmp_path, monkeypatch, capsys):
    from twinserve import cli
    result = twinserve("--help")
    assert result.returncode == 0
    assert all(f"twinserve {c}" in result.stdout for c in ("run", "analyze", "serve", "bench",
                                                           "calibrate", "checkpoint"))
    result = twinserve("run", *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "run.log").is_file()
    result = twinserve("analyze", str(tmp_path / "run"), "--out", str(tmp_path / "figs"))
    assert result.returncode == 0 and (tmp_path / "figs" / "cdf.png").is_file()
    assert twinserve("frobnicate").returncode == 2
    # a tool whose module is not installed: one clear line, exit 1
    monkeypatch.setitem(cli.TOOLS, "bench", (("no_such_bench_module",), "serve"))
    assert cli.main(["bench"]) == 1
    assert capsys.readouterr().err == ("error: twinserve bench needs the module "
                                       "'no_such_bench_module', which this install does not have\n")


def test_wheel_ships_configs_license_and_the_command(tmp_path):
    """A plain (non-editable) `pip install .` must carry conf/ (as twinserve/conf), the
    LICENSE and the `twinserve` entry point."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building needs setuptools >= 77 in this environment")
    import zipfile
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", str(REPO), "-w", str(tmp_path)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("twinserve-*.whl"))).namelist()
    shipped = {n.removeprefix("twinserve/conf/") for n in names if n.startswith("twinserve/conf/")}
    assert shipped == {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    assert any(n.endswith("licenses/LICENSE") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "twinserve = twinserve.cli:main" in zipfile.ZipFile(
        next(tmp_path.glob("twinserve-*.whl"))).read(entry_points).decode()


def test_engine_cpu_selects_a_tiny_model_that_takes_the_token_trace():
    cfg = compose_config(["mode=gpu", "engine=cpu", "trace=sharegpt_tokens"])
    rc = build(cfg)
    assert rc.engine.device == "cpu" and rc.model_name == "tiny-qwen3"
    from simulator import ModelSpec
    assert ModelSpec.from_hf_config(rc.hf_config).num_params < 50e6
    # the shipped token ids fit its vocabulary, and every request its context
    from traces import materialize
    requests = materialize(load_trace(rc.trace), rc.cache.block_size, rc.hf_config["vocab_size"],
                           rc.trace.seed)
    assert len(requests) == 300
    assert max(len(r.prompt_token_ids) + r.output_len for r in requests) <= min(
        rc.scheduler.max_model_len, rc.hf_config["max_position_embeddings"])
    # another model can still be asked for after it
    assert build(compose_config(["mode=gpu", "engine=cpu", "model=qwen3-0.6b"])).model_name == \
        "qwen3-0.6b"


def test_checkpoint_writing_shows_progress(tmp_path, capsys):
    checkpoint = pytest.importorskip("engine.checkpoint")
    checkpoint.write_random_checkpoint(checkpoint.tiny_config("qwen3"), tmp_path / "a",
                                       dtype="float32")
    assert "random weights -> a" in capsys.readouterr().err
    checkpoint.write_random_checkpoint(checkpoint.tiny_config("qwen3"), tmp_path / "b",
                                       dtype="float32", progress=False)
    assert capsys.readouterr().err == ""


def test_a_run_records_the_commit_it_was_told_where_the_tree_is_a_copy(monkeypatch):
    # a GPU machine gets a copy of the tree whose .git, if any, is not the tree's: the
    # summary's commit and a calibration's engine_commit both follow $TWINSERVE_COMMIT
    from experiments import results
    monkeypatch.setenv("TWINSERVE_COMMIT", "feedbee")
    assert results.commit() == "feedbee" and results.versions()["git"] == "feedbee"
    monkeypatch.delenv("TWINSERVE_COMMIT")
    here = results.commit()
    if here is not None:        # a git checkout: its full commit, marked dirty when changed
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", here)
