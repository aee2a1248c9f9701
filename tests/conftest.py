import os

# Triton picks interpreter or compiler when first imported: decide before any test imports
# it. CPU CI interprets the kernels; on a GPU run with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

# CI=1 selects hypothesis' deterministic profile (derandomized, no deadline).
settings.register_profile("ci", settings.get_profile("ci"), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fitted_calibration(tmp_path_factory) -> str:
    """A `fitted` calibration file for qwen3-0.6b fitted on a profile whose step times come
    from the roofline (a stand-in for the engine: tests need a file, not a measurement)."""
    import json
    from pathlib import Path

    import pandas as pd
    import yaml

    from policy import SchedulerConfig
    from simulator import CudaGraphs, HardwareSpec, ModelSpec
    from simulator.calibrate import fit_calibration, profile_grid, shape_batch
    from simulator.cost_model import RooflineCostModel
    conf = Path(__file__).resolve().parents[1] / "conf"
    model = yaml.safe_load(open(conf / "model" / "qwen3-0.6b.yaml"))
    hardware = HardwareSpec(**yaml.safe_load(open(conf / "hardware" / "h100.yaml")))
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=2048)
    graphs = CudaGraphs.for_engine(sched.max_num_seqs, sched.max_num_batched_tokens, 256)
    cost = RooflineCostModel(ModelSpec.from_hf_config(model["hf_config"], name=model["name"]),
                             hardware, graphs=graphs)
    rows = []
    for point in profile_grid(sched.max_num_seqs, sched.max_num_batched_tokens, sched.max_model_len, graphs):
        f = shape_batch(point["shape"], 16, 4000).features()
        kind, padded = graphs.rows(f)
        rows.append({**f, "kind": kind, "rows": padded, "split": point["split"],
                     "device_s": cost.predict(f), "host_launch_s": 2e-4 + 3e-6 * f["num_seqs"],
                     "host_receive_s": 5e-5 + 1e-6 * f["num_seqs"]})
    calib = fit_calibration(pd.DataFrame(rows), {"model": "qwen3-0.6b", "device": "roofline stand-in",
                                                 "command": "pytest fixture"})
    path = tmp_path_factory.mktemp("calibration") / "qwen3-0.6b-roofline-standin.json"
    path.write_text(json.dumps(calib))
    return str(path)
