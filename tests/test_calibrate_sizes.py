"""`--check-steps` by CUDA-graph size: a run whose engine ran one graph size at another speed
than the profiled engine shows that size, and only it, departing from the profile's error."""
import json
import pathlib

import pandas as pd
import pytest
import yaml

from policy.config import SchedulerConfig
from simulator import calibrate
from simulator.calibrate import fit_calibration, profile_grid, shape_batch, size_errors
from simulator.cost_model import CudaGraphs, ModelSpec, RooflineCostModel
from simulator.hardware import HardwareSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ModelSpec.from_hf_config(yaml.safe_load(open(ROOT / "conf/model/qwen3-0.6b.yaml"))["hf_config"])
HW = HardwareSpec(**yaml.safe_load(open(ROOT / "conf/hardware/h100.yaml")))
SCHED = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=2048)
GRAPHS = CudaGraphs.for_engine(SCHED.max_num_seqs, SCHED.max_num_batched_tokens, 256)
TRUTH = RooflineCostModel(MODEL, HW, graphs=GRAPHS)


def table(shapes, slow_rows=None, factor=1.0) -> pd.DataFrame:
    """Steps of these shapes with the roofline's device time; steps run as `slow_rows`
    decode rows take `factor` times as long (another engine's kernel choice at that size)."""
    out = []
    for point in shapes:
        f = shape_batch(point["shape"], 16, 4000).features()
        kind, rows = GRAPHS.rows(f)
        t = TRUTH.predict(f) * (factor if (kind, rows) == ("decode", slow_rows) else 1.0)
        out.append({**f, "kind": kind, "rows": rows, "split": point["split"], "device_s": t,
                    "host_launch_s": 2e-4, "host_receive_s": 5e-5})
    return pd.DataFrame(out)


def test_a_graph_size_that_ran_slower_than_profiled_stands_out(tmp_path, capsys):
    grid = profile_grid(SCHED.max_num_seqs, SCHED.max_num_batched_tokens, SCHED.max_model_len, GRAPHS)
    profile = table(grid)
    calib = fit_calibration(profile, {"model": "qwen3-0.6b", "device": "roofline", "command": "pytest"})
    # the "run": the profile's decode shapes again, on an engine whose 4-row graph is 20% slower
    decodes = [p for p in grid if all(n == 1 for _, n, *rest in p["shape"])]
    run = table(decodes, slow_rows=4, factor=1.2)
    sizes = size_errors(calib, GRAPHS, run, profile).set_index(["kind", "rows"])
    assert sizes.loc[("decode", 4), "run_error"] == pytest.approx(1 / 1.2 - 1, abs=0.03)
    others = sizes.drop(index=("decode", 4))
    assert (others["run_error"] - others["profile_error"]).abs().max() < 0.01
    assert sizes["profile_error"].abs().max() < 0.05
    assert sizes["n"].sum() == len(run) and sizes["share"].sum() == pytest.approx(1.0)
    # the CLI prints it after the per-kind lines
    profile.to_parquet(tmp_path / "c.profile.parquet")
    (tmp_path / "c.json").write_text(json.dumps({"model": "qwen3-0.6b", "device": "roofline", "command": "pytest",
                                                 "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 512,
                                                            "cuda_graph_max_tokens": 256}}))
    run.to_parquet(tmp_path / "steps.parquet")
    calibrate.main([str(tmp_path / "c.profile.parquet"), "--out", str(tmp_path / "refit.json"),
                    "--check-steps", str(tmp_path / "steps.parquet")])
    out = capsys.readouterr().out
    assert "by CUDA-graph size" in out
    line = next(x.split() for x in out.splitlines() if x.split()[:2] == ["decode", "4"])
    assert float(line[line.index("run") + 1].rstrip("%")) == pytest.approx(100 * (1 / 1.2 - 1), abs=3)
