"""The twin for mixtures of experts: the calibration profiles MoE steps as serving runs them
(random token ids, so rows route to many experts; token counts between the CUDA-graph
sizes), the fitted cost model carries the experts read per step (MOE_FEATURE) and predicts
held-out MoE steps with it, and the whole pipeline (calibrate -> fitted -> mode=sim) runs
on the CPU with a tiny Qwen3-MoE (conf/model/tiny-qwen3-moe.yaml)."""
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from simulator import CudaGraphs, FittedCostModel, HardwareSpec, ModelSpec, RooflineCostModel
from simulator.calibrate import fit_calibration, moe_held_out, moe_profile_columns
from simulator.profile_grid import moe_grid, profile_grid, shape_batch
from simulator.cost_model import MOE_FEATURE, step_experts_touched

REPO = Path(__file__).resolve().parents[1]


def conf(group, name):
    return yaml.safe_load((REPO / "conf" / group / f"{name}.yaml").read_text())


def moe_spec(name="qwen3-30b-a3b"):
    return ModelSpec.from_hf_config(conf("model", name)["hf_config"], name)


def test_padding_rows_route_as_one_more_token():
    assert step_experts_touched(128, 8, 1, 1) == pytest.approx(8)
    assert step_experts_touched(128, 8, 3, 4) == pytest.approx(step_experts_touched(128, 8, 4, 4))
    assert step_experts_touched(128, 8, 33, 48) < step_experts_touched(128, 8, 48, 48)
    assert step_experts_touched(128, 8, 4096, 4096) == pytest.approx(128)


def test_moe_grid_puts_token_counts_between_the_graph_sizes():
    graphs = CudaGraphs.for_engine(256, 8192, 8192)
    grid = moe_grid(256, 8192, 8192, graphs, 128, 8)
    assert grid and all(p["grid"] == "moe" for p in grid)
    decode = [p for p in grid if all(n == 1 for _, n in p["shape"])]
    chunks = [p for p in grid if len(p["shape"]) == 1 and p["shape"][0][1] > 1]
    assert decode and chunks and len(decode) + len(chunks) == len(grid)
    assert not {len(p["shape"]) for p in decode} & set(graphs.decode)
    assert not {p["shape"][0][1] for p in chunks} & set(graphs.mixed)
    for points in (decode, chunks):
        assert {p["split"] for p in points} == {"train", "held_out"}
    # past saturation (128 experts all touched from ~71 tokens) nothing is added
    assert max(len(p["shape"]) for p in decode) <= 80
    # without graphs: between the base grid's batch sizes
    eager = moe_grid(64, 512, 1024, CudaGraphs(), 16, 4)
    assert {len(p["shape"]) for p in eager if p["shape"][0][1] == 1} >= {3, 5, 7}


def stand_in_profile(spec, graphs, S=64, M=1024, L=2048):
    """A profile of the base and MoE grids whose device times a roofline (the H200's, with
    the experts read per step) stands in for."""
    hw = HardwareSpec(**conf("hardware", "h200"))
    cost = RooflineCostModel(spec, hw, 1, graphs)
    rows = []
    for point in profile_grid(S, M, L, graphs) + moe_grid(S, M, L, graphs, spec.config.num_experts,
                                                          spec.config.num_experts_per_tok):
        f = shape_batch(point["shape"], 16, 4000).features()
        kind, padded = graphs.rows(f)
        rows.append({**f, "kind": kind, "rows": padded, "split": point["split"],
                     "grid": point.get("grid", "base"), "device_s": cost.predict(f),
                     "host_launch_s": 1e-4, "host_receive_s": 1e-5})
    c = spec.config
    return moe_profile_columns(pd.DataFrame(rows), c.num_experts, c.num_experts_per_tok)


def test_fitted_model_predicts_held_out_moe_steps_with_the_experts_read():
    spec, graphs = moe_spec(), CudaGraphs.for_engine(64, 1024, 1024)
    profile = stand_in_profile(spec, graphs)
    meta = {"model": spec.name, "device": "stand-in H200", "command": "pytest",
            "moe": {"num_experts": 128, "top_k": 8, "moe_layers": 48}}
    calib = fit_calibration(profile, meta)
    assert calib["moe"]["num_experts"] == 128 and calib["moe"]["top_k"] == 8
    decode = calib["kinds"]["decode"]
    assert decode["coefficients"].get(MOE_FEATURE, 0) > 0, decode["variant"]
    report = moe_held_out(calib, profile, graphs)
    assert report["n"] > 0 and report["mape"] < 0.02
    assert report["mape"] < report["mape_without"]
    # a padded decode of 33 sequences costs less than a full graph of 48: fewer experts read
    model = FittedCostModel(json.loads(json.dumps(calib)), graphs=graphs)
    padded, full = (shape_batch([(1024, 1)] * b, 16, 4000).features() for b in (33, 48))
    assert model.predict(padded) < model.predict(full)
    # the experts read need E and k: a calibration without them is refused
    broken = {k: v for k, v in calib.items() if k != "moe"}
    with pytest.raises(ValueError, match="needs \"moe\""):
        FittedCostModel(broken)


def routed_experts(runner, batch, top_k):
    """Distinct experts per MoE layer of one step of `batch` on the runner (router hooks)."""
    import torch
    from engine.layers.moe import FusedMoE
    from engine.sampling_params import SamplingParams
    seen = []
    hooks = [m.gate.register_forward_hook(
        lambda mod, args, out: seen.append(torch.topk(out, top_k, -1).indices.unique().numel()))
        for m in runner.model.modules() if isinstance(m, FusedMoE)]
    try:
        runner.wait(runner.launch(batch, [SamplingParams(temperature=0)] * len(batch.seqs), None))
    finally:
        for h in hooks:
            h.remove()
    return seen


def write_tiny_moe(path):
    from engine.checkpoint import write_random_checkpoint
    return write_random_checkpoint("tiny-qwen3-moe", path, dtype="float32", device="cpu",
                                   progress=False, files=False)


def test_profile_rows_route_like_serving(tmp_path):
    """All-zero dummy sequences route every row to the same k experts; with random_token_ids a
    profiled decode batch reads about the experts the uniform expectation says."""
    pytest.importorskip("torch")
    from engine import LLMEngine
    from simulator.profile_grid import random_token_ids
    engine = LLMEngine(str(write_tiny_moe(tmp_path / "m")), device="cpu", dtype="float32",
                       num_gpu_blocks=128, max_model_len=256, max_num_seqs=16, enforce_eager=True)
    runner, cfg = engine.model_runner, engine.model_config
    k = cfg.num_experts_per_tok
    batch = shape_batch([(128, 1)] * 16, 16, runner.num_blocks)
    assert max(routed_experts(runner, batch, k)) <= k + 1
    random_token_ids(batch, cfg.vocab_size, seed=0)
    touched = routed_experts(runner, batch, k)
    assert min(touched) >= cfg.experts_touched(16) - 2 > k + 1
    engine.close()


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from experiments.config import register_configs
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return hydra_compose("config", overrides=overrides)


def test_moe_calibration_pipeline_end_to_end_on_the_cpu(tmp_path, capsys):
    """calibrate (engine on the CPU, tiny Qwen3-MoE) -> a calibration with the experts read
    -> cost_model=fitted drives mode=sim of the same model."""
    pytest.importorskip("torch")
    from experiments.calibrate import main as calibrate_main
    from experiments.replay import run
    model_dir = write_tiny_moe(tmp_path / "m")
    out = tmp_path / "calib.json"
    limits = ["scheduler.max_num_seqs=4", "scheduler.max_num_batched_tokens=64",
              "scheduler.max_model_len=128", "cache.num_blocks=64"]
    calibrate_main(["engine=cpu", "model=tiny-qwen3-moe", f"engine.model_path={model_dir}",
                    "calibrate.repeats=1", "calibrate.fit_hardware=false", f"calibrate.out={out}"] + limits)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    calib = json.loads(out.read_text())
    assert calib["model"] == "tiny-qwen3-moe"
    assert {k: calib["moe"][k] for k in ("num_experts", "top_k", "moe_layers")} == \
        {"num_experts": 16, "top_k": 4, "moe_layers": 2}
    assert 0 <= calib["moe"]["chunk_routing_exponent"] <= 1
    profile = pd.read_parquet(summary["profile"])
    moe = profile[profile["grid"] == "moe"]
    assert set(moe["split"]) == {"train", "held_out"}
    assert profile[MOE_FEATURE].between(4, 16).all() and profile[MOE_FEATURE].nunique() > 3
    assert summary["moe_held_out"]["n"] == int((moe["split"] == "held_out").sum())
    FittedCostModel(calib)
    run(compose(["mode=sim", "model=tiny-qwen3-moe", "cost_model=fitted", f"cost_model.path={out}",
                 "trace=synthetic", "trace.num_requests=6", "trace.prompt_len=32",
                 "trace.output_len=8", "logger=none", "progress=false"] + limits), tmp_path / "sim")
    steps = pd.read_parquet(tmp_path / "sim" / "steps.parquet")
    assert len(steps) > 0 and (steps["device_s"] > 0).all()
