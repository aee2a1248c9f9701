"""run_fidelity.py's table stage prices every real run's own steps with the calibration
(step_costs): a run the calibration itself priced shows no error; a run at another KV block
size than the profiled one is left out, saying why."""
import argparse
import bench_scripts
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.config import register_configs

REPO = Path(__file__).resolve().parents[1]
QWEN = REPO / "simulator/calibrations/qwen3-0.6b-h200-tp1.json"
run_fidelity = bench_scripts.load("benchmarks/fidelity/run_fidelity.py")


def test_step_costs_of_the_real_runs(tmp_path):
    from experiments.replay import run
    base = ["mode=sim", "trace=sharegpt", "trace.num_requests=20", "trace.request_rate=20",
            "model=qwen3-0.6b", "hardware=h200", "logger=none", "progress=false",
            "cost_model=fitted", f"cost_model.path={QWEN}"]
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        run(compose("config", overrides=base), tmp_path / "real" / "a" / "r0")
        run(compose("config", overrides=base + ["cache.block_size=64"]), tmp_path / "real" / "b" / "r0")
    args = argparse.Namespace(calibration=str(QWEN), out=tmp_path, repeats=2)
    steps = run_fidelity.step_costs(args, [{"dir": "a"}, {"dir": "b"}, {"dir": "a"}])
    priced = steps[steps["cell"] == "a"]
    assert set(priced["kind"]) == {"decode", "mixed"} and (priced["n"] > 0).all()
    assert priced["sum_error"].abs().max() == pytest.approx(0, abs=1e-9)     # its own prices
    assert priced["mean_error"].abs().max() == pytest.approx(0, abs=1e-9)
    skipped = steps[steps["cell"] == "b"]
    assert len(skipped) == 1 and "block 64, profiled at 16" in skipped["note"].iloc[0]
    summary = run_fidelity.summarize(run_fidelity.pd.DataFrame(), run_fidelity.pd.DataFrame(),
                                     run_fidelity.pd.DataFrame(), steps)
    assert set(summary["fitted_step_sum_error"]) == {"decode", "mixed"}
