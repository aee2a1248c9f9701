"""Fewer launches per decoder layer, on the Triton interpreter: SiLU-and-mul folded into the
down projection's skinny GEMM (bit for bit the unfused kernels' numbers), the load-time
choice timing that fusion against silu_and_mul + torch, and the engine's decode step with
one launch fewer per layer and the same greedy tokens."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import skinny_gemm as sk
from engine.kernels.fused import silu_and_mul
from engine.layers.linear import RowParallelLinear, dense_linear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_gemm import count_launches  # noqa: E402


def swiglu_reference(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """float64 silu(gate) * up @ w^T (+ b)."""
    gate, up = x2.double().chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k, split_k, bias", [
    (1, 70, 150, 1, False),     # nothing a multiple of a tile
    (3, 130, 300, 3, True),     # split-K, two N tiles, bias
    (17, 64, 513, 4, False),    # BLOCK_M 32, a ragged last split
])
def test_swiglu_gemm_equals_silu_and_mul_then_gemm(dtype, m, n, k, split_k, bias):
    """The fused kernel's output is bit for bit silu_and_mul followed by the same kernel (the
    activation is rounded to the dtype exactly as silu_and_mul rounds it), and close to the
    float64 reference."""
    gen = torch.Generator().manual_seed(m + n + k)
    x2 = (2 * torch.randn(m, 2 * k, generator=gen)).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    fused = sk.skinny_gemm(x2, w, b, split_k, swiglu=True)
    assert fused.shape == (m, n) and fused.dtype == dtype
    assert torch.equal(fused, sk.skinny_gemm(silu_and_mul(x2), w, b, split_k))
    ref = swiglu_reference(x2, w, b)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((fused.double() - ref).abs().max() / ref.abs().max()).item() < tolerance


def test_swiglu_gemm_rejects_a_width_that_is_not_twice_k():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"\[M, 2K\]"):
        sk.skinny_gemm(torch.randn(2, 16), w, swiglu=True)


@pytest.mark.parametrize("plan, launched", [
    (((8, 2),), ["triton _skinny_gemm_kernel"]),                  # the kernel: one launch
    (((8, 0),), ["triton _silu_and_mul_kernel", "torch"]),        # torch won at this M
    ((), ["triton _silu_and_mul_kernel", "torch"]),               # no plan (CPU, eager)
])
def test_down_projection_dispatch(plan, launched):
    """dense_linear(swiglu=True) follows the plan: SiLU-and-mul inside the kernel where the
    kernel serves the call, else silu_and_mul then F.linear; the same numbers either way."""
    gen = torch.Generator().manual_seed(3)
    x2, w = torch.randn(3, 2, 80, generator=gen), torch.randn(24, 40, generator=gen)
    with count_launches() as counts:
        y = dense_linear(x2, w, None, plan, swiglu=True)
    names = sorted(n if n.startswith("triton") else "torch" for n in counts.elements())
    assert names == sorted(launched)
    assert y.shape == (3, 2, 24)
    want = F.linear(silu_and_mul(x2.reshape(6, 80)), w).view(3, 2, 24)
    assert ((y - want).abs().max() / want.abs().max()).item() < 1e-5


def test_choice_times_the_down_projection_like_for_like(monkeypatch):
    """choose_skinny_gemm times a `swiglu_input` layer as it runs: the fused kernel on the
    [M, 2K] gate_up output against silu_and_mul + F.linear, and the plan it records sends
    the layer's calls to the fused kernel. The timer charges the launches it sees (10 each,
    the skinny kernel 15): the fused kernel (15) beats silu_and_mul + F.linear (20) for the
    down projection, while F.linear alone (10) keeps the same shape elsewhere."""
    down = RowParallelLinear(48, 16)
    down.swiglu_input = True
    plain = RowParallelLinear(48, 16)          # the same shape, not fed by an MLP
    model = torch.nn.ModuleDict(dict(down=down, plain=plain)).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    groups = sk.skinny_layers(model, "cpu")
    assert sorted(key[-1] for key in groups) == [False, True]   # grouped apart
    widths = []
    real = sk.skinny_gemm

    def gemm(x, weight, bias=None, split_k=None, config=None, swiglu=False):
        widths.append((x.shape[1], swiglu))
        return real(x, weight, bias, split_k, config, swiglu)
    monkeypatch.setattr(sk, "skinny_gemm", gemm)

    def time_us(fn) -> float:
        with count_launches() as counts:
            fn()
        return sum(15 if name.startswith("triton _skinny") else 10 for name in counts.elements())

    report = sk.choose_skinny_gemm(model, [1, 2], device_type="cpu", time_us=time_us)
    rows = {(r["swiglu"], r["m"]): r for r in report}
    assert rows[(True, 1)]["torch_us"] == 20 and rows[(False, 1)]["torch_us"] == 10
    assert all(r["triton_us"] == 15 for r in report)
    assert (96, True) in widths and (48, False) in widths
    assert all(s for _, s in down.skinny) and not any(s for _, s in plain.skinny)
    x2 = torch.randn(2, 96).to(torch.bfloat16)
    with count_launches() as counts:
        y = down(x2, swiglu=True)
    assert list(counts) == ["triton _skinny_gemm_kernel"]
    assert torch.equal(y, real(silu_and_mul(x2), down.weight, None, down.skinny[-1][1]))


def test_engine_decode_layer_launches_one_fewer_with_the_same_tokens(tmp_path):
    """A tiny Qwen3 (fp32) on the Triton backend, interpreted, with the down projections on
    the skinny kernel: greedy tokens equal the torch reference path's (which equals Hugging
    Face, tests/test_engine.py), a 150-token prompt decodes on split KV, and a decode step's
    decoder layer launches one kernel fewer than with every GEMM on torch: no silu_and_mul,
    one decode-attention launch."""
    from bench_gemm import decode_step_launches
    from engine import LLM, SamplingParams
    from engine.checkpoint import tiny_config, write_random_checkpoint
    path = str(write_random_checkpoint(tiny_config("qwen3"), tmp_path / "qwen3", dtype="float32",
                                       std=0.3, progress=False))
    prompts = [[(7 * i + 3 * j) % 500 + 3 for j in range(n)] for i, n in enumerate((5, 150, 12))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kwargs = dict(device="cpu", dtype="float32", num_gpu_blocks=64, max_model_len=192)
    want = [o.token_ids for o in LLM(path, attention_backend="torch", **kwargs).generate(
        prompts, params, use_tqdm=False)]
    llm = LLM(path, attention_backend="triton", **kwargs)
    downs = [layer.mlp.down_proj for layer in llm.model_runner.model.model.layers]
    for down in downs:
        down.skinny = ((64, 2),)
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    fused = decode_step_launches(llm, 1, 150)
    for down in downs:
        down.skinny = ()
    unfused = decode_step_launches(llm, 1, 150)
    assert fused["decode_only"] and unfused["decode_only"]
    assert fused["layer"] == unfused["layer"] - 1
    assert "triton _silu_and_mul_kernel" not in fused["layer_kernels"]
    assert unfused["layer_kernels"]["triton _silu_and_mul_kernel"] == 1
    assert fused["layer_kernels"]["triton _decode_kernel"] == 1
