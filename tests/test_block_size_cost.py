"""Attention speed by KV block size: the hardware's `attention_block_cost`, how the roofline
and fitted cost models apply it, and the benchmark that measures it (its CPU smoke run)."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from policy import Batch, Sequence
from policy.decode_plan import DecodePlan
from simulator import CudaGraphs, FittedCostModel, HardwareSpec, ModelSpec, RooflineCostModel
from simulator.cost_model import CostModelConfig, build_cost_model

REPO = Path(__file__).resolve().parents[1]
QWEN = ModelSpec.from_hf_config(yaml.safe_load(open(REPO / "conf/model/qwen3-0.6b.yaml"))["hf_config"],
                                name="qwen3-0.6b")
# the shipped H200 figures without their measured block-size table: each test sets its own
H200 = HardwareSpec(**{**yaml.safe_load(open(REPO / "conf/hardware/h200.yaml")), "attention_block_cost": None})
GRAPHS = CudaGraphs.for_engine(256, 8192, 512)
COST = {"decode": {1: 2.0, 16: 1.0, 256: 0.8}, "prefill": {1: 1.5, 16: 1.0}}
CALIBRATION = REPO / "simulator/calibrations/qwen3-0.6b-h200-tp1.json"


def step(entries) -> dict:
    """Features of a step of (context before the step, new tokens) entries: n == 1 entries
    decode, the others are prompt chunks ending the prompt."""
    batch = Batch(decode_plan=DecodePlan(8, 132, GRAPHS.decode))   # the shipped file prices the span
    for i, (start, n) in enumerate(entries):
        decode = n == 1 and start > 0
        seq = Sequence(i, [1] * (start if decode else start + n), 16)
        seq.num_tokens = start + n
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.num_computed_tokens.append(start)
        batch.sample.append(True)
        batch.num_batched_tokens += n
        batch.num_decode_seqs += decode
        batch.num_prefill_tokens += 0 if decode else n
    return batch.features()


DECODE = step([(2047, 1)] * 64)                    # decode only: 64 sequences at 2k context
NO_ATTENTION = {**DECODE, "decode_context_tokens": 0, "decode_distinct_context_tokens": 0,
                "max_context_tokens": 0, "decode_span_tokens": 0}
PREFILL = step([(1536, 512)] * 2)                  # prefill only: chunks behind a cached prefix


def test_block_cost_interpolates_in_log_space_and_holds_outside_the_measured_sizes():
    hw = replace(H200, attention_block_cost=COST)
    assert hw.attention_block_factor("decode", 16) == 1.0
    assert hw.attention_block_factor("decode", 1) == 2.0
    # halfway between 1 and 16 in log(block): the geometric mean of their costs
    assert hw.attention_block_factor("decode", 4) == pytest.approx(math.sqrt(2.0 * 1.0))
    assert 1.0 > hw.attention_block_factor("decode", 64) > 0.8
    assert hw.attention_block_factor("decode", 1024) == 0.8        # nearest measured size
    assert hw.attention_block_factor("prefill", 256) == 1.0
    # relative to the block size the efficiencies describe
    assert replace(hw, attention_reference_block=256).attention_block_factor("decode", 1) == 2.0 / 0.8


def test_roofline_decode_step_scales_its_attention_term_by_the_block_cost():
    base = RooflineCostModel(QWEN, H200, graphs=GRAPHS)
    attention = base.predict(DECODE) - base.predict(NO_ATTENTION)
    assert attention > 0
    hw = replace(H200, attention_block_cost=COST)
    for block in (1, 4, 16, 64, 256):
        model = RooflineCostModel(QWEN, hw, graphs=GRAPHS, block_size=block)
        factor = hw.attention_block_factor("decode", block)
        assert model.predict(DECODE) == pytest.approx(base.predict(DECODE) + (factor - 1) * attention, rel=1e-9)
        assert model.predict(NO_ATTENTION) == pytest.approx(base.predict(NO_ATTENTION), rel=1e-12)
    slow, fast = (RooflineCostModel(QWEN, hw, graphs=GRAPHS, block_size=b).predict(DECODE) for b in (1, 256))
    assert slow > base.predict(DECODE) > fast


def test_roofline_prefill_step_uses_the_prefill_cost():
    hw = replace(H200, attention_block_cost=COST)
    base = RooflineCostModel(QWEN, H200, graphs=GRAPHS).predict(PREFILL)
    at_1 = RooflineCostModel(QWEN, hw, graphs=GRAPHS, block_size=1).predict(PREFILL)
    no_attention = {**PREFILL, "prefill_kv_tokens": 0, "prefill_attention_pairs": 0}
    attention = base - RooflineCostModel(QWEN, H200, graphs=GRAPHS).predict(no_attention)
    assert at_1 == pytest.approx(base + (1.5 - 1) * attention, rel=1e-9)


def test_a_block_size_outside_the_measured_ones_is_logged(caplog):
    hw = replace(H200, attention_block_cost={"decode": {16: 1.0, 256: 0.9}})
    build_cost_model(CostModelConfig(), QWEN, hw, graphs=GRAPHS, block_size=64)
    assert not caplog.records
    build_cost_model(CostModelConfig(), QWEN, hw, graphs=GRAPHS, block_size=4)
    assert caplog.records[-1].getMessage() == ("hardware 'h200': attention_block_cost.decode was measured "
                                               "at block sizes 16-256; block 4 takes block 16's cost")


def test_absent_costs_change_nothing():
    assert replace(H200, attention_block_cost=None).attention_block_cost == {}   # YAML's null
    base = RooflineCostModel(QWEN, H200, graphs=GRAPHS)
    for block in (1, 16, 256):
        assert RooflineCostModel(QWEN, H200, graphs=GRAPHS, block_size=block).predict(DECODE) == base.predict(DECODE)
    decode_only = replace(H200, attention_block_cost={"decode": COST["decode"]})
    assert (RooflineCostModel(QWEN, decode_only, graphs=GRAPHS, block_size=1).predict(PREFILL)
            == base.predict(PREFILL))
    fitted = FittedCostModel.load(CALIBRATION, GRAPHS)
    assert FittedCostModel.load(CALIBRATION, GRAPHS, H200, 1).predict(DECODE) == fitted.predict(DECODE)


def test_fitted_model_scales_attention_by_the_run_block_over_the_profiled_block():
    calib = json.loads(CALIBRATION.read_text())
    assert calib["engine"]["block_size"] == 16
    hw = replace(H200, attention_block_cost=COST)
    fitted = FittedCostModel(calib, graphs=GRAPHS)
    attention = fitted.predict(DECODE) - fitted.predict(NO_ATTENTION)
    assert attention > 0
    for block in (1, 4, 256):
        scaled = FittedCostModel(calib, graphs=GRAPHS, hw=hw, block_size=block)
        factor = hw.attention_block_factor("decode", block)
        assert scaled.predict(DECODE) == pytest.approx(fitted.predict(DECODE) + (factor - 1) * attention, rel=1e-9)
    # at the profiled block size nothing changes, whatever block the roofline's efficiencies describe
    same = FittedCostModel(calib, graphs=GRAPHS, hw=replace(hw, attention_reference_block=256), block_size=16)
    assert same.predict(DECODE) == fitted.predict(DECODE)
    # a profile made at block 64: block 64 is then the unscaled one
    at_64 = {**calib, "engine": {**calib["engine"], "block_size": 64}}
    ratio = hw.attention_block_factor("decode", 1) / hw.attention_block_factor("decode", 64)
    assert (FittedCostModel(at_64, graphs=GRAPHS, hw=hw, block_size=1).predict(DECODE)
            == pytest.approx(fitted.predict(DECODE) + (ratio - 1) * attention, rel=1e-9))
    built = build_cost_model(CostModelConfig(kind="fitted", path=str(CALIBRATION)), QWEN, hw,
                             graphs=GRAPHS, block_size=1)
    assert built.predict(DECODE) == pytest.approx(fitted.predict(DECODE) + attention, rel=1e-9)
    unrecorded = {**calib, "engine": {}}      # the engine's default block size, 16
    assert (FittedCostModel(unrecorded, graphs=GRAPHS, hw=hw, block_size=1).predict(DECODE)
            == pytest.approx(fitted.predict(DECODE) + attention, rel=1e-9))
    with pytest.raises(ValueError, match="engine.block_size must be an integer >= 1, got 0"):
        FittedCostModel({**calib, "engine": {"block_size": 0}}, graphs=GRAPHS, hw=hw, block_size=1)


@pytest.mark.parametrize("cost, message", [
    ({"decod": {16: 1.0}}, "attention_block_cost has unknown key 'decod' (known: decode, prefill)"),
    ({"decode": {4: 0}}, "attention_block_cost.decode[4] must be a number > 0, got 0"),
    ({"decode": {4: -1.5}}, "attention_block_cost.decode[4] must be a number > 0, got -1.5"),
    ({"decode": {"x": 1.0}}, "attention_block_cost.decode has key 'x': block sizes must be integers >= 1"),
    ({"decode": {0: 1.0}}, "attention_block_cost.decode has key 0: block sizes must be integers >= 1"),
    ({"decode": {16: 1.0, "16": 1.0}}, "attention_block_cost.decode gives block size 16 twice"),
    ({"decode": {}}, "attention_block_cost.decode must be a non-empty mapping"),
    ([1.0], "attention_block_cost must be a mapping"),
    ([], "attention_block_cost must be a mapping"),
])
def test_bad_block_costs_are_one_line_errors(cost, message):
    with pytest.raises(ValueError) as e:
        replace(H200, attention_block_cost=cost)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_hardware_yaml_fails_the_run_with_one_line(tmp_path):
    (tmp_path / "hardware").mkdir()
    bad = {**yaml.safe_load(open(REPO / "conf/hardware/h200.yaml")), "name": "bad",
           "attention_block_cost": {"decode": {4: -1.0, 16: 1.0}}}
    (tmp_path / "hardware" / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "logger=none", "progress=false",
                             "trace.num_requests=5", "hardware=bad", f"hydra.searchpath=[file://{tmp_path}]",
                             f"hydra.run.dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, WANDB_SILENT="true", HYDRA_FULL_ERROR="0"))
    assert result.returncode == 1
    assert result.stderr == "error: hardware 'bad': attention_block_cost.decode[4] must be a number > 0, got -1.0\n"


def test_a_run_at_block_size_1_is_slower_by_the_hardware_costs(tmp_path):
    """Through the config: the simulator's run takes the run's cache.block_size to the cost model."""
    from experiments.config import build, register_configs
    from experiments.replay import run
    from hydra import compose, initialize_config_dir
    register_configs()
    base = ["logger=none", "progress=false", "trace.num_requests=30", "hardware=h200", "cache.block_size=1"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        plain = compose("config", overrides=base)
        costed = compose("config", overrides=base + ["++hardware.attention_block_cost.decode={1: 3.0, 16: 1.0}"])
    assert build(costed).hardware.attention_block_factor("decode", 1) == 3.0
    fast, slow = run(plain, tmp_path / "plain"), run(costed, tmp_path / "costed")
    assert slow["mean_tpot_ms"] > fast["mean_tpot_ms"]


def test_bench_smoke_measures_every_block_size_and_writes_the_hardware_file(tmp_path):
    """The benchmark's CPU run (Triton interpreter, tiny shapes): a relative cost per block
    size for both kernels, 1.0 at block 16, written into a hardware file (twice: the second
    write replaces the first), which then loads with exactly those costs."""
    hw = tmp_path / "h200.yaml"
    shipped = (REPO / "conf/hardware/h200.yaml").read_text()   # without its measured table
    original = shipped.split("# Attention time by KV block size")[0]
    hw.write_text(original)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_attention.py"), "--smoke",
                             "--stages", "blocks", "--block-sizes", "1,64", "--write-hardware", str(hw),
                             "--write-hardware", str(hw)],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decode attention time by KV block size" in result.stdout
    cost = json.loads(result.stdout.strip().splitlines()[-1])["block_cost"]
    for kernel in ("decode", "prefill"):
        assert set(cost[kernel]) == {"1", "16", "64"} and cost[kernel]["16"] == 1.0
        assert all(c > 0 for c in cost[kernel].values())
    text = hw.read_text()
    assert text.startswith(original) and text.count("attention_block_cost:") == 1
    written = HardwareSpec(**yaml.safe_load(text))
    assert written.attention_block_cost == {k: {int(b): c for b, c in t.items()} for k, t in cost.items()}
    assert replace(written, attention_block_cost={}) == H200
