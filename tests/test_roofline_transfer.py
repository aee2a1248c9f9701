"""benchmarks/roofline_transfer.py: real runs re-simulated with the roofline and each hardware
file, counted per fidelity cell against the target. A simulated run stands in for the real
one (its summary marked mode=gpu, its step durations as device times), so a re-simulation
with the hardware file that made it reproduces it, and a slower file misses."""
import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import yaml
from hydra import compose, initialize_config_dir

from experiments.config import register_configs
from experiments.replay import run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import roofline_transfer  # noqa: E402


def fake_real_run(run_dir: Path) -> Path:
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=["logger=none", "progress=false", "model=qwen3-0.6b", "hardware=h200",
                                           "cost_model=roofline", "trace.num_requests=12"])
    run(cfg, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps(dict(summary, mode="gpu")))
    steps = pd.read_parquet(run_dir / "steps.parquet")
    steps.assign(device_s=steps["duration_s"]).to_parquet(run_dir / "steps.parquet")
    return run_dir


def test_cells_within_target_with_the_file_that_made_them_and_not_with_a_slower_one(tmp_path, capsys):
    runs = [fake_real_run(tmp_path / "real" / "sharegpt-L0" / f"r{k}") for k in (0, 1)]
    from simulator.hardware import HardwareSpec
    same = REPO / "conf" / "hardware" / "h200.yaml"
    fields = yaml.safe_load(same.read_text())
    slow = dataclasses.asdict(HardwareSpec(**fields))
    slow.update(flops_efficiency=fields["flops_efficiency"] / 3, bandwidth_efficiency=fields["bandwidth_efficiency"] / 3)
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(slow))
    roofline_transfer.main(["--out", str(tmp_path / "sim"), "--hardware", f"same={same}",
                            "--hardware", f"slow={tmp_path / 'slow.yaml'}", *map(str, runs)])
    out = capsys.readouterr().out
    assert "sharegpt-L0" in out and "per cell" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["metrics_off_target"] == {"same": 0, "slow": result["metrics_off_target"]["slow"]}
    assert result["metrics_off_target"]["slow"] >= 5            # latencies ~3x: every latency metric off
    assert result["mean_abs_error"]["same"]["mean_tpot_ms"] < 0.01
