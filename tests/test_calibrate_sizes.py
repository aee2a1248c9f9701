"""`--check-steps` by CUDA-graph size: a run whose engine ran one graph size at another speed
than the profiled engine shows that size, and only it, departing from the profile's error."""
import json
import pathlib

import numpy as np
import pandas as pd
import pytest
import yaml

from policy.config import SchedulerConfig
from simulator import calibrate
from simulator.calibrate import fit_calibration, size_errors
from simulator.profile_grid import profile_grid, shape_batch
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


def test_causal_pairs_are_exact_from_the_features():
    """cost_model.prefill_causal_pairs: sum of n (n + 1) / 2 over a step's prompt chunks,
    whatever their sizes, prefixes and the decodes beside them."""
    from simulator.cost_model import prefill_causal_pairs
    rng = np.random.default_rng(0)
    for _ in range(200):
        chunks = [(int(rng.integers(0, 3000)), int(rng.integers(2, 600))) for _ in range(rng.integers(0, 4))]
        decodes = [(int(rng.integers(2, 4000)), 1) for _ in range(rng.integers(0, 5))]
        shape = [(start + n, n) for start, n in chunks] + decodes
        if not shape:
            continue
        f = shape_batch(shape, 16, 1 << 16).features()
        assert prefill_causal_pairs(f) == sum(n * (n + 1) // 2 for _, n in chunks)


def test_a_pair_behind_a_long_prefix_is_priced_at_its_own_rate(monkeypatch):
    """A stand-in engine whose causal pairs (a chunk with itself: masked diagonal tiles)
    cost 2.5x a pair with the context before the chunk: the fit keeps the causal feature
    (the held-out shapes say so) and prices chunks behind 6k tokens of context as the engine
    runs them, where the same fit without it, every pair alike, cannot."""
    from simulator.cost_model import FittedCostModel, prefill_causal_pairs
    graphs = CudaGraphs.for_engine(16, 2048, 2048)

    def engine(f):
        rows = graphs.rows(f)[1]
        return (1e-3 + 2e-6 * rows + 1e-9 * f["prefill_attention_pairs"] + 1.5e-9 * prefill_causal_pairs(f)
                + 3e-9 * f["decode_context_tokens"])

    rows = []
    for point in profile_grid(16, 2048, 8192, graphs):
        f = shape_batch(point["shape"], 16, 4000).features()
        kind, padded = graphs.rows(f)
        rows.append({**f, "kind": kind, "rows": padded, "split": point["split"],
                     "device_s": engine(f), "host_launch_s": 2e-4, "host_receive_s": 5e-5})
    meta = {"model": "qwen3-0.6b", "device": "stand-in", "command": "pytest"}
    calib = fit_calibration(pd.DataFrame(rows), meta)
    assert "without prefill_causal_pairs" not in calib["kinds"]["mixed"]["variant"]
    monkeypatch.setattr(calibrate, "with_causal_pairs", lambda table: table)
    without = fit_calibration(pd.DataFrame(rows), meta)
    assert "prefill_causal_pairs" not in without["kinds"]["mixed"]["coefficients"]
    behind = [shape_batch([(6000 + n, n)] + [(1000, 1)] * 4, 16, 4000).features() for n in (100, 700, 1500)]

    def error(c):
        model = FittedCostModel(c, graphs=graphs)
        return max(abs(model.predict(f) / engine(f) - 1) for f in behind)
    assert error(calib) < 0.005 < 0.01 < error(without)
