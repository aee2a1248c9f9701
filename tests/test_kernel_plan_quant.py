"""engine.kernel_plan for 4-bit models: the W4A16 launches one engine chose (by timing) are
written down, and a second engine given that file runs the same launches, to the same greedy
tokens, without timing anything; a plan of another quantization format, group size,
act-order or model is refused in one line naming what differs. On the CPU: the engine
interprets its Triton kernels (TRITON_INTERPRET=1, attention_backend="triton"); the timed
side runs ModelRunner.choose_kernels as on a GPU, with the timer replaced."""
import dataclasses
import os
import random
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU-interpreter tests (tensors on the CPU)")

from engine import LLM, SamplingParams, kernel_plan  # noqa: E402
from engine.checkpoint import quantization_config, tiny_config, write_random_checkpoint  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.kernels import skinny_gemm, w4a16  # noqa: E402
from engine.layers import quant  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.models import ModelConfig, build_model  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPTS = [[5, 6, 7], [9 + i for i in range(11)]]
M_VALUES = [1, 2, 4, 16]   # the row counts the stand-in choice measures (prefill: 14 rows)
ENGINE = dict(device="cpu", dtype="float32", attention_backend="triton", num_gpu_blocks=64,
              max_model_len=32, max_num_seqs=4, max_num_batched_tokens=32)


def random_timer(seed):
    """A stand-in for the GPU timer: every (M, launch) costs a fixed random time, so the
    choice is one a real timing could make, and engines of other seeds choose otherwise."""
    def time_us(fn, m, launch):
        return random.Random(f"{seed}/{m}/{launch}").uniform(1.0, 2.0)
    return time_us


def time_as_on_a_gpu(seed):
    """quant.choose_kernels as the engine calls it on CUDA (repack, then choose_w4a16), at
    the few row counts the test's steps have and with random_timer (verify off: every
    candidate's product is checked in tests/test_quant_kernels.py)."""
    def choose_kernels(model, pdl_rows=0):
        quant.repack_layers(model)
        return w4a16.choose_w4a16(model, m_values=M_VALUES, time_us=random_timer(seed), verify=False)
    return choose_kernels


def runner_on_a_gpu(llm, path):
    """The parts of a ModelRunner choose_kernels reads, as a runner on CUDA would have them
    (the model stays on the CPU: its kernels are interpreted)."""
    config = dataclasses.replace(llm.config, kernel_plan=str(path))
    return SimpleNamespace(config=config, device=torch.device("cuda"), pdl=None, rank=0,
                           model=llm.model_runner.model, packer=llm.model_runner.packer)


def plans(model):
    return {name: layer.w4a16 for name, layer in model.named_modules() if getattr(layer, "w4a16", ())}


def forbid_timing(monkeypatch):
    """Every start-up timer raises: a plan given means none of them runs."""
    def timed(*args, **kwargs):
        raise AssertionError("a timer ran although a kernel plan was given")
    for module, name in ((skinny_gemm, "graph_time_us"), (w4a16, "graph_time_us"),
                         (w4a16, "choose_w4a16"), (quant, "choose_kernels"),
                         (skinny_gemm, "choose_skinny_gemm")):
        monkeypatch.setattr(module, name, timed)
    monkeypatch.setattr("engine.model_runner.choose_moe_tiles", timed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_random_checkpoint(tiny_config("llama"), tmp_path_factory.mktemp("w4plan") / "gptq",
                                       dtype="float16", std=0.3, progress=False,
                                       quantization=quantization_config("gptq", 32)))


def test_a_quantized_engine_runs_the_launches_another_engine_timed(checkpoint, tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    monkeypatch.setattr("torch.cuda.get_device_name", lambda device=None: "cpu")
    # engine A: no plan file yet, so its runner times (the stand-in timer) and writes one
    first = LLM(checkpoint, **ENGINE)
    monkeypatch.setattr(quant, "choose_kernels", time_as_on_a_gpu(seed=1))
    reports = ModelRunner.choose_kernels(runner_on_a_gpu(first, path), "triton")
    assert len(reports[2]) == len(M_VALUES) * len(w4a16.quantized_layers(first.model_runner.model))
    chosen = plans(first.model_runner.model)
    assert path.exists() and chosen
    # the file also pins the split rule the engine ran (engine.kernel_plan "decode")
    assert kernel_plan.read_decode_rule(str(path)) == first.model_runner.packer.decode_plan.kernel_rule()
    kinds = {launch.kind for plan in chosen.values() for _, launch in plan}
    assert len(kinds) >= 3   # the choice is varied: the comparison below means something

    # the launches the layers run, as they run
    ran, real = [], w4a16.w4a16_matmul
    monkeypatch.setattr(w4a16, "w4a16_matmul", lambda x, w, b, launch: ran.append(launch) or real(x, w, b, launch))
    first_tokens = [o.token_ids for o in first.generate(PROMPTS, GREEDY, use_tqdm=False)]
    first_ran, ran[:] = list(ran), []

    # engine B: reads the file, times nothing; another engine's timing would choose otherwise
    monkeypatch.setattr(quant, "choose_kernels", time_as_on_a_gpu(seed=2))
    other = runner_on_a_gpu(LLM(checkpoint, **ENGINE), tmp_path / "other.json")
    ModelRunner.choose_kernels(other, "triton")
    assert plans(other.model) != chosen
    forbid_timing(monkeypatch)
    second = LLM(checkpoint, **ENGINE, kernel_plan=str(path))
    assert plans(second.model_runner.model) == chosen
    ran[:] = []
    second_tokens = [o.token_ids for o in second.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert second_tokens == first_tokens and ran == first_ran
    assert len({launch.kind for launch in first_ran}) >= 2   # the layers ran the kernels, varied
    assert set(first_ran) <= {launch for plan in chosen.values() for _, launch in plan}
    # and the kernels compute the model: the torch reference path gives the same tokens
    reference = LLM(checkpoint, **{**ENGINE, "attention_backend": "torch"})
    assert [o.token_ids for o in reference.generate(PROMPTS, GREEDY, use_tqdm=False)] == first_tokens
    assert len({t for out in first_tokens for t in out}) > 4   # the comparison means something

    # the runner given the file times nothing either (what a GPU engine does at start)
    again = runner_on_a_gpu(LLM(checkpoint, **ENGINE), path)
    assert ModelRunner.choose_kernels(again, "triton") == ([], [], [])
    assert plans(again.model) == chosen
    described = kernel_plan.describe(kernel_plan.read(str(path)))
    assert {k.split("/m")[-1] for k in described if k.startswith("w4a16 ")} == {str(m) for m in M_VALUES}
    assert set(described.values()) >= {w4a16.launch_name(launch) for plan in chosen.values() for _, launch in plan}


def tiny_quantized(**quantization):
    """A tiny llama with random 4-bit weights in `quantization`'s layout (no checkpoint)."""
    qc = quantization_config(**{"method": "gptq", "group_size": 32, **quantization})
    model = build_model(ModelConfig.from_hf({**tiny_config("llama"), "quantization_config": qc}), torch.float32)
    gen = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if getattr(layer, "quant", None) is not None:
            layer.qweight.random_(generator=gen)
            layer.scales.uniform_(0.01, 0.02, generator=gen)
            layer.qzeros.fill_(0x77777777)
            if hasattr(layer, "g_idx"):
                layer.g_idx.copy_(torch.arange(layer.in_features) // layer.quant.group_size)
    return model


@pytest.fixture(scope="module")
def gptq_plan():
    model = tiny_quantized()
    quant.repack_layers(model)
    w4a16.choose_w4a16(model, m_values=[1, 4], time_us=random_timer(3), verify=False)
    return kernel_plan.snapshot(model, "gpu0", "cpu")


@pytest.mark.parametrize("model, words", [
    (dict(method="awq"), "format 'gptq' in the plan, 'awq' here"),
    (dict(group_size=64), "group_size 32 in the plan, 64 here"),
    (dict(desc_act=True), "act_order False in the plan, True here"),
    (None, "has W4A16 layer groups this model lacks"),
], ids=["awq", "group-64", "act-order", "bf16"])
def test_a_plan_of_another_format_or_model_is_refused(gptq_plan, model, words):
    model = tiny_quantized(**model) if model is not None else build_model(
        ModelConfig.from_hf(tiny_config("llama")), torch.float32)
    with pytest.raises(ValueError, match=words):
        kernel_plan.apply(model, gptq_plan, "gpu0", "p.json", "cpu", parts=("w4a16",))


def test_a_plan_without_w4a16_launches_or_with_broken_ones_is_refused(gptq_plan):
    bf16_plan = {k: v for k, v in gptq_plan.items() if k != "w4a16"}
    with pytest.raises(ValueError, match="has no W4A16 layer group .*; it has none"):
        kernel_plan.apply(tiny_quantized(), bf16_plan, "gpu0", "p.json", "cpu", parts=("w4a16",))
    name = next(iter(gptq_plan["w4a16"]))
    for launch, words in (({"kind": "warp9"}, "unknown kind 'warp9'"),
                          ({"kind": "stream", "tile": 4}, "malformed launch")):
        broken = {**gptq_plan, "w4a16": {**gptq_plan["w4a16"], name: {
            **gptq_plan["w4a16"][name], "plan": [[1, launch]]}}}
        with pytest.raises(ValueError, match=words):
            kernel_plan.apply(tiny_quantized(), broken, "gpu0", "p.json", "cpu", parts=("w4a16",))


def test_applied_launches_size_the_scratch_and_workspace_as_the_choice_does(gptq_plan):
    """apply leaves what choose_w4a16 leaves: the dequantization scratch exactly where a
    plan uses it, and the split-K workspace the plan's launches need (they run in it)."""
    model = tiny_quantized()
    name = next(iter(gptq_plan["w4a16"]))
    dequant = {**gptq_plan, "w4a16": {n: {**e, "plan": [[1, {"kind": "skinny", "block_n": 32, "block_k": 32,
                                                             "split_k": 4}], [64, {"kind": "dequant"}]]}
                                      for n, e in gptq_plan["w4a16"].items()}}
    w4a16._SCRATCH.clear()
    skinny_gemm._WORKSPACES.clear()
    kernel_plan.apply(model, dequant, "gpu0", "p.json", "cpu", parts=("w4a16",))
    largest = max(n * k for n, k, *_ in w4a16.quantized_layers(model))
    assert w4a16._SCRATCH[(torch.device("cpu"), torch.float32)].numel() == largest
    partial, arrivals = skinny_gemm._WORKSPACES[torch.device("cpu")]
    assert partial.numel() >= 4 and not arrivals.any()
    kernel_plan.apply(tiny_quantized(), gptq_plan, "gpu0", "p.json", "cpu", parts=("w4a16",))
    uses_dequant = any(launch["kind"] == "dequant" for e in gptq_plan["w4a16"].values() for _, launch in e["plan"])
    assert bool(w4a16._SCRATCH) == uses_dequant
    assert name in kernel_plan.snapshot(model, "gpu0", "cpu")["w4a16"]


def test_a_calibration_records_the_w4a16_launches(gptq_plan):
    """experiments.calibrate.pinned_plan (what a calibration records as `kernel_plan`)
    includes a quantized model's launches, even where no dense layer has a skinny plan."""
    from experiments.calibrate import pinned_plan
    model = tiny_quantized()
    engine = SimpleNamespace(model_runner=SimpleNamespace(model=model))
    assert pinned_plan(engine, "gpu0") is None   # nothing chosen yet (as on the CPU)
    kernel_plan.apply(model, gptq_plan, "gpu0", "p.json", "cpu", parts=("w4a16",))
    pinned = pinned_plan(engine, "gpu0")
    assert pinned["w4a16"] == gptq_plan["w4a16"] and not any(g["plan"] for g in pinned["skinny"].values())
