"""engine.kernel_plan for mixture-of-experts models: the fused-MoE tiles one engine chose (by
timing) are written down, and a second engine given that file runs the same tiles, to the
same greedy tokens, without timing anything; a plan of other experts, top-k or model is
refused in one line naming what differs. On the CPU the engine interprets its Triton kernels
(TRITON_INTERPRET=1, attention_backend="triton"); bf16 experts, as choose_moe_tiles tunes."""
import os
import random

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU-interpreter tests (tensors on the CPU)")

from engine import LLM, SamplingParams, kernel_plan  # noqa: E402
from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402
from engine.kernels import fused_moe as fm  # noqa: E402
from engine.kernels import skinny_gemm  # noqa: E402
from engine.layers.moe import FusedMoE  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPTS = [[5, 6, 7], [9 + i for i in range(11)]]
ENGINE = dict(device="cpu", dtype="bfloat16", attention_backend="triton", num_gpu_blocks=64,
              max_model_len=32, max_num_seqs=4, max_num_batched_tokens=32)


def choose_at_random(model, seed, monkeypatch):
    """fused_moe.choose_moe_tiles as the engine runs it on CUDA, with a stand-in timer: every
    (kernel, rows per block, tiles) costs a fixed random time (the kernels are not run)."""
    calls = []
    with monkeypatch.context() as m:
        m.setattr(fm, "gate_up", lambda x, w13, pairs, blocks, top_k, block_m, tiles: calls.append(("up", block_m, tiles)))
        m.setattr(fm, "down", lambda h, w2, weights, pairs, blocks, block_m, tiles: calls.append(("down", block_m, tiles)))

        def time_us(fn):
            calls.clear()
            fn()
            return sum(random.Random(f"{seed}/{c}").uniform(1.0, 2.0) for c in calls)
        return fm.choose_moe_tiles(model, ENGINE["max_num_batched_tokens"], device_type="cpu", time_us=time_us)


def tiles(model):
    return {name: m.moe_tiles for name, m in model.named_modules() if isinstance(m, FusedMoE)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_random_checkpoint(tiny_config("qwen3_moe"), tmp_path_factory.mktemp("moeplan") / "moe",
                                       dtype="bfloat16", std=0.3, progress=False))


def test_an_moe_engine_runs_the_tiles_another_engine_timed(checkpoint, tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    first = LLM(checkpoint, **ENGINE)
    report = choose_at_random(first.model_runner.model, 1, monkeypatch)
    assert [r["tokens"] for r in report] == fm.bucket_sizes(ENGINE["max_num_batched_tokens"])
    chosen = tiles(first.model_runner.model)
    assert chosen and all(chosen.values())
    kernel_plan.write(str(path), kernel_plan.snapshot(first.model_runner.model, "cpu", "cpu"))

    used, real = [], fm.tiles_for   # the tiles each MoE call runs
    monkeypatch.setattr(fm, "tiles_for", lambda *a: used.append(real(*a)) or used[-1])
    first_tokens = [o.token_ids for o in first.generate(PROMPTS, GREEDY, use_tqdm=False)]
    first_used, used[:] = list(used), []
    assert first_used and all(t in {t for plan in chosen.values() for _, t in plan} for t in first_used)

    other = LLM(checkpoint, **ENGINE)            # another engine's timing chooses otherwise
    choose_at_random(other.model_runner.model, 2, monkeypatch)
    assert tiles(other.model_runner.model) != chosen

    def timed(*args, **kwargs):
        raise AssertionError("a timer ran although a kernel plan was given")
    monkeypatch.setattr(skinny_gemm, "graph_time_us", timed)
    monkeypatch.setattr(fm, "choose_moe_tiles", timed)
    monkeypatch.setattr("engine.model_runner.choose_moe_tiles", timed)
    second = LLM(checkpoint, **ENGINE, kernel_plan=str(path))
    assert tiles(second.model_runner.model) == chosen
    assert [o.token_ids for o in second.generate(PROMPTS, GREEDY, use_tqdm=False)] == first_tokens
    assert used == first_used
    assert len({t for out in first_tokens for t in out}) > 4
    described = kernel_plan.describe(kernel_plan.read(str(path)))
    assert sum(k.startswith("moe ") for k in described) == len(fm.bucket_sizes(ENGINE["max_num_batched_tokens"]))


def experts(num_experts=8, top_k=2, hidden=32, layers=2):
    model = torch.nn.ModuleList(FusedMoE(hidden, 48, num_experts, top_k, True) for _ in range(layers))
    for layer in model:
        layer.fused = True
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module")
def moe_plan():
    model = experts()
    with pytest.MonkeyPatch.context() as m:
        choose_at_random(model, 3, m)
    return kernel_plan.snapshot(model, "gpu0", "cpu")


@pytest.mark.parametrize("model, words", [
    (dict(top_k=1), "top_k 2 in the plan, 1 here"),
    (dict(num_experts=4), r"has no MoE layer group 4x96x32/top2/bfloat16 \(another model"),
    (dict(layers=0), "has MoE layer groups this model lacks"),
], ids=["top-k", "experts", "dense"])
def test_a_plan_of_other_experts_is_refused(moe_plan, model, words):
    with pytest.raises(ValueError, match=words):
        kernel_plan.apply(experts(**model), moe_plan, "gpu0", "p.json", "cpu", parts=("moe",))


def test_a_plan_read_back_sets_every_layer_and_a_broken_one_is_refused(moe_plan):
    model = experts()
    kernel_plan.apply(model, moe_plan, "gpu0", "p.json", "cpu", parts=("moe",))
    assert all(layer.moe_tiles == model[0].moe_tiles != () for layer in model)
    assert kernel_plan.snapshot(model, "gpu0", "cpu")["moe"] == moe_plan["moe"]
    (name, entry), = moe_plan["moe"].items()
    broken = {**moe_plan, "moe": {name: {**entry, "plan": [[1, {"block_m": 16, "gate_up": {"tile": 1}}]]}}}
    with pytest.raises(ValueError, match=f"MoE layer group {name} has a malformed tile entry"):
        kernel_plan.apply(experts(), broken, "gpu0", "p.json", "cpu", parts=("moe",))
