"""benchmarks/fidelity/step_residuals.py on a run whose every step the calibration priced
(a simulated run with the fitted model: device_s is the model's own prediction, the host
window its host model): the tool must line each step up with the batch the replay formed
and find no error, whatever the grouping."""
import bench_scripts
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.config import register_configs
from simulator.hardware import HostCosts

REPO = Path(__file__).resolve().parents[1]
QWEN = REPO / "simulator/calibrations/qwen3-0.6b-h200-tp1.json"
step_residuals = bench_scripts.load("benchmarks/fidelity/step_residuals.py")


def simulated_run(calibration: Path, out: Path) -> None:
    """A 25-request ShareGPT run of the simulator priced by `calibration`, into `out`."""
    from experiments.replay import run
    overrides = ["mode=sim", "trace=sharegpt", "trace.num_requests=25", "trace.request_rate=20",
                 "model=qwen3-0.6b", "hardware=h200", "logger=none", "progress=false",
                 "cost_model=fitted", f"cost_model.path={calibration}", "cache.enable_prefix_caching=false"]
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        run(compose("config", overrides=overrides), out)


def test_a_run_priced_by_the_calibration_has_no_residual(tmp_path, capsys):
    simulated_run(QWEN, tmp_path / "run")
    step_residuals.main(["--calibration", str(QWEN), str(tmp_path / "run")])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["decode"]["n"] > 100 and "mixed" in summary
    for kind in ("decode", "mixed"):
        assert summary[kind]["mean_error"] == pytest.approx(0, abs=1e-9)
        assert summary[kind]["weighted_error"] == pytest.approx(0, abs=1e-9)
    assert "by KV block layout" in out and "by the spread of their contexts" in out
    assert "by the tokens run in the second before them" in out
    for group in summary["prompt_steps_by_tokens_before"].values():   # priced by its own model
        assert group["mean_error"] == pytest.approx(0, abs=1e-9)
    assert "the profile's own mixed shapes in the same groups" in out   # (the calibration's profile, found beside it)
    # the simulated host window before each launch is the calibration's host model (the
    # window the simulator charged: cost_model.host_window's default)
    host = HostCosts.from_calibration(json.loads(QWEN.read_text()))
    assert summary["host_us_median"]["decode/0"] > 1e6 * host.launch_s
    # a directory that holds no run is refused in one line
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="not a run directory"):
        step_residuals.main(["--calibration", str(QWEN), str(tmp_path / "empty")])


def test_tokens_before_counts_the_steps_started_in_the_window_before_each():
    import numpy as np
    start = np.array([0.0, 0.4, 0.9, 1.3, 2.5])
    tokens = np.array([100, 10, 1, 1000, 5])
    got = step_residuals.tokens_before(start, tokens, window_s=1.0)
    # step 3 (t=1.3) counts the steps at 0.4 and 0.9, not the one at 0.0 (1.3 s before); step 4
    # (t=2.5) none: the last started 1.2 s before it
    assert got.tolist() == [0, 100, 110, 11, 0]


def test_a_run_priced_under_the_clock_term_has_no_residual_under_it(tmp_path, capsys):
    """The simulator's clock (SimExecutor) and the diagnostics' (the term along a run's own
    device timeline, as the fit reads the profile's) are one rule: a run simulated with a clock
    term shows no residual under it, and a clear one without it."""
    from simulator.clock import flops_per_unit
    from simulator.cost_model import ModelSpec
    import yaml
    cfg = yaml.safe_load((REPO / "conf/model/qwen3-0.6b.yaml").read_text())
    flops = flops_per_unit(ModelSpec.from_hf_config(cfg["hf_config"], name="qwen3-0.6b"))
    calib = json.loads(QWEN.read_text())
    calib["clock"] = {"tau_s": 0.02, "slowdown": {"decode": 2.0, "prompt": 1.0}, "flops": flops}
    clocked = tmp_path / "clocked.json"
    clocked.write_text(json.dumps(calib))
    simulated_run(clocked, tmp_path / "run")
    summaries = {}
    for name, path in (("with", clocked), ("without", QWEN)):
        step_residuals.main(["--calibration", str(path), str(tmp_path / "run")])
        summaries[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "clock" in summaries["with"] and "clock" not in summaries["without"]
    for kind in ("decode", "mixed"):
        assert summaries["with"][kind]["weighted_error"] == pytest.approx(0, abs=2e-4)
        assert summaries["without"][kind]["weighted_error"] < -0.005    # the clock made every step longer


def test_step_errors_price_a_clocked_calibration_along_the_run(tmp_path):
    """simulator.calibrate.step_errors (the fidelity table's steps.csv, `--check-steps`) prices
    each step under a calibration's clock term along the run, as the simulator priced it: no
    error on a run simulated with the term; the same file without it prices every step short."""
    from experiments.plan_features import plan_features
    from simulator.calibrate import step_errors
    from simulator.clock import flops_per_unit
    from simulator.cost_model import CudaGraphs, ModelSpec
    import yaml
    cfg = yaml.safe_load((REPO / "conf/model/qwen3-0.6b.yaml").read_text())
    calib = json.loads(QWEN.read_text())
    plain = dict(calib)
    calib["clock"] = {"tau_s": 0.02, "slowdown": {"decode": 2.0, "prompt": 1.0},
                      "flops": flops_per_unit(ModelSpec.from_hf_config(cfg["hf_config"], name="qwen3-0.6b"))}
    clocked = tmp_path / "clocked.json"
    clocked.write_text(json.dumps(calib))
    simulated_run(clocked, tmp_path / "run")
    steps = plan_features(tmp_path / "run", calib["decode_plan"])
    graphs = CudaGraphs.for_engine(256, 8192, 8192)
    for kind, e in step_errors(calib, graphs, steps).items():
        assert e["predicted_s"] / e["measured_s"] - 1 == pytest.approx(0, abs=1e-3), kind
    for kind, e in step_errors(plain, graphs, steps).items():
        assert e["predicted_s"] / e["measured_s"] - 1 < -0.005, kind
    with pytest.raises(ValueError, match="gpu_gap_s"):
        step_errors(calib, graphs, steps.drop(columns=["gpu_gap_s"]))


def test_the_profiles_own_shapes_are_priced_under_the_clock_term_along_its_order():
    """A warm GPU runs prompt steps slower: a profile shape after heavy ones is priced above its
    base price, by the median of its back-to-back steps; with no slowdown the price is the base."""
    import numpy as np
    import pandas as pd
    from simulator.clock import ClockTerm
    profile = pd.DataFrame({"num_prefill_tokens": [4096, 4096, 0], "num_batched_tokens": [4096, 4096, 16],
                            "prefill_attention_pairs": [8e6, 8e6, 0.0], "decode_context_tokens": [0, 0, 16_000],
                            "num_sampled": [1, 1, 16], "device_s": [0.05, 0.05, 0.002],
                            "pred": [0.05, 0.05, 0.002]})
    flops = {"token": 1.6e10, "sampled": 1e9, "pair": 1e6}
    hot = step_residuals.with_profile_clock(profile, ClockTerm(0.075, {"decode": 0.2, "prompt": 0.35}, flops))
    cool = step_residuals.with_profile_clock(profile, ClockTerm(0.075, {"decode": 0.0, "prompt": 0.0}, flops))
    assert np.allclose(cool["pred"], profile["pred"]) and np.allclose(cool["err"], 0)
    assert (hot["pred"] >= profile["pred"]).all()
    assert hot["pred"].iloc[1] > hot["pred"].iloc[0] > profile["pred"].iloc[0]   # warmer after the first
    assert np.allclose(hot["err"], hot["pred"] / profile["device_s"] - 1)
