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
def stand_in_calibration(tmp_path_factory):
    """A calibration file of the real format for qwen3-0.6b, fitted on a profile whose
    device times a roofline (conf/hardware/h100) stands in for: tests of code that takes a
    calibration, where no GPU-made one is shipped for the case."""
    import json
    from pathlib import Path

    import pandas as pd
    import yaml

    from simulator import CudaGraphs, HardwareSpec, ModelSpec, RooflineCostModel
    from simulator.calibrate import fit_calibration
    from simulator.profile_grid import profile_grid, shape_batch
    conf = Path(__file__).resolve().parents[1] / "conf"
    model = yaml.safe_load((conf / "model" / "qwen3-0.6b.yaml").read_text())
    hw = HardwareSpec(**yaml.safe_load((conf / "hardware" / "h100.yaml").read_text()))
    cost = RooflineCostModel(ModelSpec.from_hf_config(model["hf_config"], model["name"]), hw)
    rows = []
    for point in profile_grid(16, 512, 2048, CudaGraphs()):
        f = shape_batch(point["shape"], 16, 1000).features()
        rows.append({**f, "kind": "eager", "rows": f["num_batched_tokens"], "split": point["split"],
                     "device_s": cost.predict(f), "host_launch_s": 1e-4, "host_receive_s": 1e-5})
    calib = fit_calibration(pd.DataFrame(rows), {"model": "qwen3-0.6b", "device": "stand-in GPU",
                                                 "command": "pytest"})
    path = tmp_path_factory.mktemp("calibration") / "qwen3-0.6b-stand-in.json"
    path.write_text(json.dumps(calib))
    return str(path)
