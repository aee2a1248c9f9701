"""The joint fit of a GPU's roofline parameters over several models' profiles
(simulator.hardware_fit), the roofline terms it fits, and the fidelity table's
--roofline-hardware file."""
import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

import bench_scripts
from simulator import hardware_fit
from simulator.profile_grid import profile_grid, shape_batch
from simulator.cost_model import CudaGraphs, RooflineCostModel
from simulator.hardware import HardwareSpec
from tests.test_simulator import H100, H100_DATASHEET, load_model

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = CudaGraphs.for_engine(16, 512, 256)
ENGINE = {"max_num_seqs": 16, "max_num_batched_tokens": 512, "cuda_graph_max_tokens": 256,
          "block_size": 16, "pdl_max_tokens": 8}
# A device the search must find: every fitted term away from the file's leads.
TRUTH = dataclasses.replace(H100, flops_efficiency=0.6, attention_flops_efficiency=0.35,
                            bandwidth_efficiency=0.75, step_fixed_s=1e-4, layer_fixed_s=20e-6,
                            pdl_layer_saving_s=5e-6, layer_launch_s=40e-6, roofline_exponent=2.0,
                            gemm_depth_overhead=600.0)
SEARCHED = ("flops_efficiency", "gemm_depth_overhead", "attention_flops_efficiency", "bandwidth_efficiency",
            "roofline_exponent")
FIXED = ("step_fixed_s", "layer_fixed_s", "pdl_layer_saving_s", "layer_launch_s")   # the grid has eager steps


def write_profile(tmp_path, model: str, hw: HardwareSpec, device="NVIDIA H100", tp=1, every=1) -> Path:
    """A profile of the small grid (every `every`-th shape) whose device times the roofline
    with `hw` makes, and its metadata JSON, as `experiments.calibrate` writes them."""
    cost = RooflineCostModel(load_model(model), hw, tp, GRAPHS, pdl_max_tokens=ENGINE["pdl_max_tokens"])
    rows = []
    for point in profile_grid(16, 512, 2048, GRAPHS)[::every]:
        f = shape_batch(point["shape"], 16, 4000).features()
        kind, padded = GRAPHS.rows(f)
        rows.append({**f, "kind": kind, "rows": padded, "split": point["split"], "device_s": cost.predict(f),
                     "host_launch_s": 3e-4 + 2e-6 * f["num_seqs"] + 1.5e-7 * f["num_prefill_tokens"]
                                      + 2.5e-4 * (f["num_prefill_tokens"] > 0),
                     "host_receive_s": 4e-5 + 1e-6 * f["num_seqs"]})
    path = tmp_path / f"{model}-tp{tp}.profile.parquet"
    pd.DataFrame(rows).to_parquet(path)
    meta = {"model": model, "device": device, "tp": tp, "engine_commit": "abc1234", "command": "pytest",
            "engine": dict(ENGINE, tensor_parallel_size=tp)}
    path.with_name(path.name.replace(".profile.parquet", ".json")).write_text(json.dumps(meta))
    return path


def test_joint_fit_recovers_the_parameters_a_roofline_made(tmp_path):
    """Two models of different sizes tell a step's fixed cost from its weight reads (one
    model cannot: both are the same every step), of different depths (28 and 80 layers) its
    per-step from its per-layer part, and of different widths (GEMMs 1-3k and 8-28k deep)
    the GEMM rate from its per-output overhead; the fit finds the device that made them."""
    profiles = [hardware_fit.load_profile(write_profile(tmp_path, m, TRUTH)) for m in ("qwen3-0.6b", "llama-3.1-70b")]
    searched, fixed = hardware_fit.fitted_params(profiles)
    assert set(SEARCHED) < set(searched) and fixed == FIXED
    params = ({k: v for k, v in searched.items() if k in SEARCHED}, fixed)
    fitted = hardware_fit.fit_joint(profiles, H100, sweeps=5, params=params, polish_iterations=600)
    for name in SEARCHED + FIXED:
        assert getattr(fitted, name) == pytest.approx(getattr(TRUTH, name), rel=0.15), name
    for p in profiles:
        assert all(e["mape"] < 0.02 for e in hardware_fit.kind_errors(p, fitted).values())
    # host costs: least squares over both profiles' steps
    assert fitted.step_overhead_s == pytest.approx(3e-4) and fitted.seq_overhead_s == pytest.approx(2e-6)
    assert fitted.prefill_token_overhead_s == pytest.approx(1.5e-7)
    assert fitted.prefill_step_overhead_s == pytest.approx(2.5e-4)
    assert fitted.update_overhead_s == pytest.approx(4e-5)


def test_what_the_profiles_cannot_determine_is_not_fitted(tmp_path):
    dense = [hardware_fit.load_profile(write_profile(tmp_path, "qwen3-0.6b", TRUTH))]
    searched, fixed = hardware_fit.fitted_params(dense)
    assert "allreduce_latency_s" not in fixed and "pdl_layer_saving_s" in fixed
    graphed = hardware_fit.load_profile(write_profile(tmp_path, "qwen3-0.6b", TRUTH))
    graphed = dataclasses.replace(graphed, steps=graphed.steps[graphed.steps["kind"] != "eager"], _rows={})
    assert "layer_launch_s" not in hardware_fit.fitted_params([graphed])[1]
    # what the profiles cannot determine is HardwareSpec's lead, not the file's value (a file
    # fitted with a tp=2 profile must not lend its all-reduce latency to a fit without it)
    kept = hardware_fit.fit_joint([graphed], dataclasses.replace(H100, allreduce_latency_s=7e-6, layer_launch_s=1e-6),
                                  sweeps=1, polish_iterations=5)
    leads = {f.name: f.default for f in dataclasses.fields(HardwareSpec)}
    assert kept.allreduce_latency_s == leads["allreduce_latency_s"] and kept.layer_launch_s == leads["layer_launch_s"]
    assert "shared_kv_read_cost" in searched           # the grid has decodes sharing blocks


def test_what_one_dense_model_or_no_moe_cannot_tell_stays_at_the_lead(tmp_path):
    """K0 needs dense models of two widths, the expert GEMMs' rate a mixture of experts; a
    file that states the attention FLOP efficiency (measured) keeps it, and the fit's file
    neither searches nor rewrites it."""
    one = [hardware_fit.load_profile(write_profile(tmp_path, "qwen3-0.6b", TRUTH, every=7))]
    two = one + [hardware_fit.load_profile(write_profile(tmp_path, "llama-3.1-70b", TRUTH, every=7))]
    assert "gemm_depth_overhead" not in hardware_fit.fitted_params(one)[0]
    assert "gemm_depth_overhead" in hardware_fit.fitted_params(two)[0]
    assert "expert_flops_efficiency" not in hardware_fit.fitted_params(two)[0]
    assert "attention_flops_efficiency" in hardware_fit.fitted_params(two, H100)[0]       # not stated
    measured = dataclasses.replace(H100, attention_flops_efficiency=0.123, expert_flops_efficiency=0.4,
                                   gemm_depth_overhead=7.0)
    assert "attention_flops_efficiency" not in hardware_fit.fitted_params(two, measured)[0]
    kept = hardware_fit.fit_joint(one, measured, sweeps=1, polish_iterations=5)
    assert kept.attention_flops_efficiency == 0.123                # measured: kept
    assert kept.gemm_depth_overhead == hardware_fit.LEADS["gemm_depth_overhead"]   # not the file's 7
    assert kept.expert_flops_efficiency is None                    # not the file's: no MoE profile
    # written as such: a null the source file lacks is added, a stated one replaced
    for text in (H100_DATASHEET, H100_DATASHEET + "expert_flops_efficiency: 0.4\n"):
        hardware_fit.write_spec(kept, tmp_path / "out.yaml", text, ["expert_flops_efficiency", "gemm_depth_overhead"], ["t"])
        written = (tmp_path / "out.yaml").read_text()
        assert "expert_flops_efficiency: null" in written and written.count("expert_flops_efficiency") == 1


def test_bad_profiles_are_refused_in_one_line(tmp_path, capsys):
    good = write_profile(tmp_path, "qwen3-0.6b", TRUTH)
    empty = tmp_path / "empty.profile.parquet"
    pd.read_parquet(good).iloc[:0].to_parquet(empty)
    (tmp_path / "empty.json").write_text(good.with_name("qwen3-0.6b-tp1.json").read_text())
    with pytest.raises(ValueError, match="no steps"):
        hardware_fit.load_profile(empty)
    with pytest.raises(ValueError, match="no metadata"):
        hardware_fit.load_profile(good, meta_path=tmp_path / "missing.json")
    other = write_profile(tmp_path / "..", "llama-3.1-8b", TRUTH, device="NVIDIA A100")
    profiles = [hardware_fit.load_profile(good), hardware_fit.load_profile(other)]
    with pytest.raises(ValueError, match="different devices"):
        hardware_fit.check_profiles(profiles)
    with pytest.raises(ValueError, match="two models"):
        hardware_fit.leave_one_out(profiles[:1], H100)
    hw_file = ROOT / "conf" / "hardware" / "h100.yaml"
    for bad in ([str(empty)], [str(good), str(other)]):
        with pytest.raises(SystemExit) as e:
            hardware_fit.main(bad + ["--hardware", str(hw_file)])
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


def test_roofline_terms(tmp_path):
    qwen = load_model("qwen3-0.6b")
    decode = shape_batch([(512, 1)] * 4, 16, 1000).features()
    chunk = shape_batch([(2048, 512)], 16, 1000).features()
    plain = RooflineCostModel(qwen, H100, graphs=GRAPHS)
    # PDL: a step of at most pdl_max_tokens rows saves pdl_layer_saving_s per layer
    hw = dataclasses.replace(H100, layer_fixed_s=20e-6, pdl_layer_saving_s=5e-6)
    with_pdl = RooflineCostModel(qwen, hw, graphs=GRAPHS, pdl_max_tokens=8)
    without = RooflineCostModel(qwen, hw, graphs=GRAPHS)
    assert without.predict(decode) - with_pdl.predict(decode) == pytest.approx(5e-6 * qwen.num_layers)
    assert without.predict(chunk) == with_pdl.predict(chunk)
    # combining exponent: infinity is the max (the default); a finite one costs more, p = 1 the sum
    assert RooflineCostModel(qwen, dataclasses.replace(H100, roofline_exponent=math.inf), graphs=GRAPHS
                             ).predict(chunk) == plain.predict(chunk)
    assert H100.roofline(2.0, 1.0) == 2.0
    assert dataclasses.replace(H100, roofline_exponent=1.0).roofline(2.0, 1.0) == pytest.approx(3.0)
    assert dataclasses.replace(H100, roofline_exponent=2.0).roofline(3.0, 4.0) == pytest.approx(5.0)
    # attention FLOP efficiency: only the attention terms change
    slow = RooflineCostModel(qwen, dataclasses.replace(H100, attention_flops_efficiency=0.1), graphs=GRAPHS)
    assert slow.predict(chunk) > plain.predict(chunk)
    no_attention = dict(chunk, prefill_kv_tokens=0, prefill_attention_pairs=0, decode_context_tokens=0,
                        decode_distinct_context_tokens=0)
    assert slow.predict(no_attention) == plain.predict(no_attention)
    with pytest.raises(ValueError, match="pdl_layer_saving_s"):
        dataclasses.replace(H100, pdl_layer_saving_s=1e-6)          # above layer_fixed_s (0)
    with pytest.raises(ValueError, match="roofline_exponent"):
        dataclasses.replace(H100, roofline_exponent=0.5)


def test_gemm_shapes_and_their_depth_overhead():
    """The roofline's GEMMs are the model's linear layers as the engine shards them; K0
    charges a narrow model's GEMMs more than a wide one's, and a mixture of experts' expert
    GEMMs run at their own rate."""
    from simulator.cost_model import layer_gemms
    for name, tp in (("qwen3-0.6b", 1), ("llama-3.1-70b", 2), ("qwen3-30b-a3b", 1), ("pythia-1.4b", 1)):
        cfg = load_model(name).config
        dense, experts = layer_gemms(cfg, tp)
        flop = sum(c * n * k for c, n, k in dense) + cfg.num_experts_per_tok * sum(c * n * k for c, n, k in experts)
        assert flop == load_model(name).matmul_params // tp, name
    chunk = shape_batch([(0, 512)], 16, 1000).features()
    compute_bound = dataclasses.replace(H100, hbm_bandwidth_gbs=1e9)     # weights read in no time
    growth = {}
    for name in ("qwen3-0.6b", "llama-3.1-70b"):
        model = load_model(name)
        plain = RooflineCostModel(model, compute_bound, graphs=GRAPHS)
        deep = RooflineCostModel(model, dataclasses.replace(compute_bound, gemm_depth_overhead=512.0), graphs=GRAPHS)
        growth[name] = deep.predict(chunk) / plain.predict(chunk)
    assert growth["qwen3-0.6b"] > growth["llama-3.1-70b"] > 1.0
    moe, qwen = load_model("qwen3-30b-a3b"), load_model("qwen3-0.6b")
    slow = dataclasses.replace(compute_bound, expert_flops_efficiency=0.2)
    for model, changes in ((moe, True), (qwen, False)):
        before = RooflineCostModel(model, compute_bound, graphs=GRAPHS).predict(chunk)
        assert (RooflineCostModel(model, slow, graphs=GRAPHS).predict(chunk) > before) == changes
    for bad in ({"gemm_depth_overhead": -1.0}, {"expert_flops_efficiency": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(H100, **bad)


def test_cli_writes_the_joint_and_leave_one_out_files(tmp_path, capsys):
    paths = [str(write_profile(tmp_path, m, TRUTH, every=5)) for m in ("qwen3-0.6b", "llama-3.1-70b")]
    out, given = tmp_path / "h100-fit.yaml", tmp_path / "h100.yaml"
    given.write_text(H100_DATASHEET)   # datasheet peaks and leads: the fits start from leads
    hardware_fit.main(paths + ["--hardware", str(given), "--out", str(out),
                               "--leave-one-out", str(tmp_path / "loo"), "--sweeps", "1", "--polish", "10"])
    text = out.read_text()
    assert "qwen3-0.6b-tp1 (engine abc1234)" in text and "command: python -m simulator.hardware_fit" in text
    joint = HardwareSpec(**yaml.safe_load(text))
    assert joint.peak_tflops == H100.peak_tflops and joint.hbm_bandwidth_gbs == H100.hbm_bandwidth_gbs
    for model in ("qwen3-0.6b", "llama-3.1-70b"):
        HardwareSpec(**yaml.safe_load((tmp_path / "loo" / f"h100-without-{model}.yaml").read_text()))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert set(json.loads(last)) == {"joint", "leave_one_out"}


def test_fidelity_roofline_hardware_overrides():
    """The table's roofline row with a given hardware file: every field the file's, the ones
    it leaves out at HardwareSpec's defaults (not conf/hardware's), through Hydra."""
    run_fidelity = bench_scripts.load("benchmarks/fidelity/run_fidelity.py")

    from experiments.config import build
    leads = ROOT / "conf" / "hardware" / "rtx4090.yaml"     # no fitted terms: all left out
    rc = build(run_fidelity.compose_cfg(["model=qwen3-0.6b", "hardware=h200", "mode=sim", "cost_model=roofline"]
                                        + run_fidelity.hardware_overrides(leads)))
    assert rc.hardware == dataclasses.replace(HardwareSpec(**yaml.safe_load(leads.read_text())), name="h200")
    assert rc.hardware.roofline_exponent == math.inf and rc.hardware.attention_flops_efficiency is None


def test_write_hardware_takes_numpy_values(tmp_path):
    """A fit hands back numpy scalars; the file must still be written and read back."""
    import numpy as np
    from simulator.calibrate import write_hardware
    hw = dataclasses.replace(H100, flops_efficiency=np.float64(0.61), layer_fixed_s=np.float32(2e-5))
    path = tmp_path / "hw.yaml"
    write_hardware(hw, path, "numpy values")
    back = yaml.safe_load(path.read_text())
    assert back["flops_efficiency"] == pytest.approx(0.61)
    assert back["layer_fixed_s"] == pytest.approx(2e-5)
    assert HardwareSpec(**back) == dataclasses.replace(hw, flops_efficiency=0.61, layer_fixed_s=back["layer_fixed_s"])


def test_transfer_takes_the_fitted_values_and_keeps_the_gpus_own(tmp_path):
    """A GPU of a fitted one's die, without profiles: the fitted rates, shape and engine costs
    carried over, its own peaks, memory, interconnect and measured block costs kept; another
    die refused."""
    fitted = dataclasses.replace(TRUTH, name="big", hbm_bandwidth_gbs=4800.0, memory_gib=140.0,
                                 interconnect_gbs=900.0, step_overhead_s=3e-4, seq_overhead_s=2e-6,
                                 shared_kv_read_cost=0.5, attention_block_cost={"decode": {64: 0.9}})
    target = HardwareSpec(name="small", peak_tflops=fitted.peak_tflops, hbm_bandwidth_gbs=3350.0,
                          memory_gib=80.0, interconnect_gbs=450.0, attention_block_cost={"decode": {64: 0.99}})
    spec, taken = hardware_fit.transfer(fitted, target)
    for name in ("name", "peak_tflops", "hbm_bandwidth_gbs", "memory_gib", "interconnect_gbs", "attention_block_cost"):
        assert getattr(spec, name) == getattr(target, name) and name not in taken
    assert {"flops_efficiency", "layer_fixed_s", "step_overhead_s", "attention_flops_efficiency"} <= set(taken)
    for name in taken:
        assert getattr(spec, name) == getattr(fitted, name)
    stated = dataclasses.replace(target, attention_flops_efficiency=0.5)    # measured on this GPU: kept
    assert hardware_fit.transfer(fitted, stated)[0].attention_flops_efficiency == 0.5
    with pytest.raises(ValueError, match="one compute die"):
        hardware_fit.transfer(fitted, dataclasses.replace(target, peak_tflops=312.0))


def test_cli_transfer_writes_the_file_with_its_source(tmp_path, capsys):
    source = tmp_path / "big.yaml"
    fitted = dataclasses.replace(TRUTH, name="big", hbm_bandwidth_gbs=4800.0)
    source.write_text("# fit: fitted jointly on 2 profiles of GPU X:\n"
                      + yaml.safe_dump({k: v for k, v in dataclasses.asdict(fitted).items() if v is not None}))
    target = tmp_path / "small.yaml"
    target.write_text("# small: a datasheet\nname: small\npeak_tflops: 989.0\nhbm_bandwidth_gbs: 3350.0\n"
                      "memory_gib: 80.0\n")
    out = tmp_path / "out.yaml"
    hardware_fit.main(["--transfer-from", str(source), "--hardware", str(target), "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# small: a datasheet") and f"transferred from {source}" in text
    assert "# fit:   fitted jointly on 2 profiles of GPU X:" in text
    spec = HardwareSpec(**yaml.safe_load(text))
    assert spec.hbm_bandwidth_gbs == 3350.0 and spec.flops_efficiency == pytest.approx(TRUTH.flops_efficiency)
    assert spec.layer_fixed_s == pytest.approx(TRUTH.layer_fixed_s)
    with pytest.raises(SystemExit, match="needs --out"):
        hardware_fit.main(["--transfer-from", str(source), "--hardware", str(target)])
    other = tmp_path / "other.yaml"
    other.write_text("name: other\npeak_tflops: 312.0\nhbm_bandwidth_gbs: 2039.0\nmemory_gib: 80.0\n")
    with pytest.raises(SystemExit, match="one compute die"):
        hardware_fit.main(["--transfer-from", str(source), "--hardware", str(other), "--out", str(out)])
