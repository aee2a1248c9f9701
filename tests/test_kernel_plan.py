"""engine.kernel_plan: the skinny-GEMM choice written to a file and read back, so two engines
run the same kernels; a calibration's recorded plan is read like a plan file; plans of another
device or model are refused in one line."""
import json

import pytest
import torch

from engine import kernel_plan
from engine.kernels import skinny_gemm as sk
from engine.layers.embed_head import ParallelLMHead
from engine.layers.linear import ColumnParallelLinear, RowParallelLinear


def tiny(out=40):
    """Layers of four groups: two qkv-like layers after a norm, a down projection that takes
    SiLU-and-mul, an o projection, the LM head."""
    model = torch.nn.ModuleDict(dict(
        a=ColumnParallelLinear(32, out), b=ColumnParallelLinear(32, out),
        down=RowParallelLinear(48, 32), o=RowParallelLinear(64, 32), head=ParallelLMHead(50, 32)))
    model["a"].norm_input = model["b"].norm_input = True
    model["down"].swiglu_input = True
    return model.to(torch.bfloat16)


def choose(model, seed):
    """What choose_skinny_gemm leaves on the layers, drawn at random per group and M."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda: [(m, int(torch.randint(0, 4, (), generator=gen)) * 2) for m in (1, 2, 4, 8)]  # noqa: E731
    for key, layers in sk.skinny_layers(model, "cpu").items():
        plan, swiglu, norm = draw(), draw(), draw()
        for layer in layers:
            layer.skinny = tuple(plan)
            if key[4]:
                layer.skinny_swiglu = tuple(swiglu)
            if key[5]:
                layer.skinny_norm = tuple(norm)


def plans(model):
    return {name: (layer.skinny, getattr(layer, "skinny_swiglu", ()), getattr(layer, "skinny_norm", ()))
            for name, layer in model.items()}


def test_a_written_plan_read_back_gives_another_engine_the_same_kernels(tmp_path):
    first, second = tiny(), tiny()
    choose(first, seed=1)
    choose(second, seed=2)                 # the second engine's own timing chose otherwise
    assert plans(first) != plans(second)
    path = tmp_path / "plan.json"
    kernel_plan.write(str(path), kernel_plan.snapshot(first, "gpu0", "cpu"))
    plan = kernel_plan.read(str(path))
    assert plan["format"] == kernel_plan.FORMAT and len(plan["skinny"]) == 4
    kernel_plan.apply(second, plan, "gpu0", str(path), "cpu")
    assert plans(second) == plans(first)
    assert not list(tmp_path.glob(".*tmp"))   # written through a temporary file, renamed


def test_a_calibration_records_a_plan_that_reads_as_one(tmp_path):
    model = tiny()
    choose(model, seed=3)
    calibration = {"model": "tiny", "fits": {}, "kernel_plan": kernel_plan.snapshot(model, "gpu0", "cpu")}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration))
    other = tiny()
    kernel_plan.apply(other, kernel_plan.read(str(path)), "gpu0", str(path), "cpu")
    assert plans(other) == plans(model)


def test_missing_file_means_time_and_write(tmp_path):
    assert kernel_plan.read(str(tmp_path / "none.json")) is None


@pytest.mark.parametrize("content, words", [
    ("{not json", "not readable JSON"),
    (json.dumps({"model": "tiny", "fits": {}}), "nor a calibration that records one"),
    (json.dumps({"format": "other/9", "skinny": {}}), "not a twinserve-kernel-plan/1 file"),
])
def test_a_file_that_is_not_a_plan_is_refused(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=words):
        kernel_plan.read(str(path))


def test_a_plan_of_another_device_or_model_is_refused():
    model = tiny()
    choose(model, seed=4)
    plan = kernel_plan.snapshot(model, "NVIDIA H100", "cpu")
    with pytest.raises(ValueError, match="made on 'NVIDIA H100', this engine runs on 'NVIDIA H200'"):
        kernel_plan.apply(tiny(), plan, "NVIDIA H200", "p.json", "cpu")
    with pytest.raises(ValueError, match="has no layer group 48x32/bfloat16"):
        kernel_plan.apply(tiny(out=48), plan, "NVIDIA H100", "p.json", "cpu")


def test_the_setting_is_checked_and_reaches_the_engine_and_the_server(tmp_path):
    from engine.config import EngineConfig
    from server.cli import parse_args
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="kernel_plan must be a file path or None"):
        EngineConfig(model=str(tmp_path), kernel_plan="")
    assert EngineConfig(model=str(tmp_path), kernel_plan="p.json").kernel_plan == "p.json"
    assert parse_args(["--model", "m", "--kernel-plan", "p.json"]).kernel_plan == "p.json"
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--backend", "sim", "--hardware", "h200", "--kernel-plan", "p.json"])
