"""Fewer launches per decoder layer, on the Triton interpreter: SiLU-and-mul folded into the
down projection's skinny GEMM (bit for bit the unfused kernels' numbers), the residual add
and RMSNorm folded into the qkv / gate_up skinny GEMMs, the load-time choice timing each
fusion against the unfused kernels, and the engine's decode step with three launches fewer
per layer and the same greedy tokens.

On a GPU machine, `TRITON_INTERPRET=0 pytest tests/test_fusion.py` runs the kernel and
dispatch checks on CUDA (compiled kernels); the tests of CPU layers and engines skip."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import skinny_gemm as sk
from engine.kernels.fused import add_rmsnorm, silu_and_mul
from engine.layers.layernorm import RMSNorm
from engine.layers.linear import ColumnParallelLinear, RowParallelLinear, dense_linear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_gemm import count_launches  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" else "cpu"
interpreted = pytest.mark.skipif(DEVICE != "cpu", reason="CPU layers on the Triton interpreter")


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
    x2 = (2 * torch.randn(m, 2 * k, generator=gen)).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    fused = sk.skinny_gemm(x2, w, b, split_k, swiglu=True)
    assert fused.shape == (m, n) and fused.dtype == dtype
    assert torch.equal(fused, sk.skinny_gemm(silu_and_mul(x2), w, b, split_k))
    ref = swiglu_reference(x2, w, b).cpu()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((fused.cpu().double() - ref).abs().max() / ref.abs().max()).item() < tolerance


def test_swiglu_gemm_rejects_a_width_that_is_not_twice_k():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"\[M, 2K\]"):
        sk.skinny_gemm(torch.randn(2, 16), w, swiglu=True)
    with pytest.raises(ValueError, match="norm weight"):
        sk.skinny_gemm_rmsnorm(torch.randn(2, 16), None, torch.ones(15), 1e-6, w)


@pytest.mark.parametrize("fused_plan, plan, launched", [
    (((8, 2),), ((8, 0),), ["triton _skinny_gemm_kernel"]),                 # fused: one launch
    (((8, 0),), ((8, 2),), ["triton _silu_and_mul_kernel", "triton _skinny_gemm_kernel"]),
    (((8, 0),), ((8, 0),), ["triton _silu_and_mul_kernel", "torch"]),       # torch won at this M
    ((), (), ["triton _silu_and_mul_kernel", "torch"]),                     # no plan (CPU, eager)
])
def test_down_projection_dispatch(fused_plan, plan, launched):
    """dense_linear(swiglu=True) follows the plans: SiLU-and-mul inside the kernel where
    `skinny_swiglu` takes the call, else silu_and_mul then the plain plan's path (the kernel
    or F.linear); the same numbers every way."""
    gen = torch.Generator().manual_seed(3)
    x2, w = torch.randn(3, 2, 80, generator=gen).to(DEVICE), torch.randn(24, 40, generator=gen).to(DEVICE)
    with count_launches() as counts:
        y = dense_linear(x2, w, None, plan, swiglu=True, skinny_swiglu=fused_plan)
    names = sorted(n if n.startswith("triton") else "torch" for n in counts.elements())
    assert names == sorted(launched)
    assert y.shape == (3, 2, 24)
    want = F.linear(silu_and_mul(x2.reshape(6, 80)), w).view(3, 2, 24)
    assert ((y - want).abs().max() / want.abs().max()).item() < 1e-5


@interpreted
def test_choice_gives_the_down_projection_a_swiglu_plan(monkeypatch):
    """choose_skinny_gemm times a `swiglu_input` layer's plain call on silu_and_mul's output
    (so the kernel without the fusion stays a choice), then the kernel with SiLU-and-mul in
    its prologue on the [M, 2K] gate_up output against silu_and_mul + the path chosen, and
    records that in `skinny_swiglu`. The timer charges the launches it sees (10 each, the
    skinny kernel 15): F.linear (10) wins the plain call, the fused kernel (15) beats
    silu_and_mul + F.linear (20); a layer of the same shape not fed by an MLP gets no
    swiglu plan."""
    down = RowParallelLinear(48, 16)
    down.swiglu_input = True
    plain = RowParallelLinear(48, 16)          # the same shape, not fed by an MLP
    model = torch.nn.ModuleDict(dict(down=down, plain=plain)).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    groups = sk.skinny_layers(model, "cpu")
    assert sorted(key[4] for key in groups) == [False, True]   # grouped apart (swiglu)
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
    swiglu_rows = [r for r in report if r["swiglu"]]
    assert len(swiglu_rows) == 2 and all(r["torch_us"] == 10 and r["triton_us"] == 15
                                         and r["swiglu_pair_us"] == 20 and r["swiglu_fused_us"] == 15
                                         for r in swiglu_rows)
    assert (96, True) in widths and (48, False) in widths
    assert down.skinny == plain.skinny == ((1, 0), (2, 0))
    assert all(s for _, s in down.skinny_swiglu) and plain.skinny_swiglu == ()
    x2 = torch.randn(2, 96).to(torch.bfloat16)
    with count_launches() as counts:
        y = down(x2, swiglu=True)
    assert list(counts) == ["triton _skinny_gemm_kernel"]
    assert torch.equal(y, real(silu_and_mul(x2), down.weight, None, down.skinny_swiglu[-1][1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n, k, split_k, residual, bias", [
    (1, 70, 150, 1, True, False),
    (3, 130, 300, 3, True, True),      # split-K (only program (0, 0) writes the residual)
    (5, 64, 256, 2, False, False),     # the first layer: no residual yet
])
def test_rmsnorm_gemm_equals_add_rmsnorm_then_gemm(dtype, m, n, k, split_k, residual, bias):
    """skinny_gemm_rmsnorm: the residual stream it returns is add_rmsnorm's bit for bit (x
    itself without a residual), and the product is add_rmsnorm then the kernel up to the
    order of the norm's sum of squares: within one rounding of the output, and close to
    the float64 reference."""
    gen = torch.Generator().manual_seed(m * 7 + k)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    res = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE) if residual else None
    nw = (1 + 0.2 * torch.randn(k, generator=gen)).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    y, h = sk.skinny_gemm_rmsnorm(x, res, nw, 1e-6, w, b, split_k)
    normed, want_h = add_rmsnorm(x, nw, 1e-6, res) if residual else (add_rmsnorm(x, nw, 1e-6), x)
    assert torch.equal(h, want_h) and (residual or h is x)
    unfused = sk.skinny_gemm(normed, w, b, split_k).float()
    ulp = 2e-6 if dtype == torch.float32 else 1e-2       # one rounding of the output's scale
    assert ((y.float() - unfused).abs().max() / unfused.abs().max()).item() <= ulp
    hd = want_h.cpu().double()
    ref = F.linear(hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.cpu().double(),
                   w.cpu().double(), None if b is None else b.cpu().double())
    assert ((y.cpu().double() - ref).abs().max() / ref.abs().max()).item() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("plan, residual, launched", [
    (((4, 2),), True, ["triton _skinny_gemm_kernel"]),
    (((4, 2),), False, ["triton _skinny_gemm_kernel"]),
    (((4, 0),), True, ["triton _add_rmsnorm_kernel", "torch"]),
    ((), True, ["triton _add_rmsnorm_kernel", "torch"]),
])
def test_forward_rmsnorm_follows_the_norm_plan(plan, residual, launched):
    """LinearBase.forward_rmsnorm: one launch where the `skinny_norm` plan takes the rows,
    else the norm kernel then the layer; the same residual stream and (up to the norm's
    summation order) the same output either way, as the layer's norm + forward give."""
    torch.manual_seed(0)
    layer, norm = ColumnParallelLinear(48, 40, bias=True), RMSNorm(48, 1e-6)
    torch.nn.init.normal_(layer.weight), torch.nn.init.normal_(layer.bias), torch.nn.init.normal_(norm.weight)
    norm.fused = True
    layer.skinny_norm = plan
    layer, norm = layer.to(DEVICE), norm.to(DEVICE)
    x, res = torch.randn(3, 48, device=DEVICE), (torch.randn(3, 48, device=DEVICE) if residual else None)
    with count_launches() as counts:
        y, h = layer.forward_rmsnorm(x, res, norm)
    names = sorted(n if n.startswith("triton") else "torch" for n in counts.elements())
    assert names == sorted(launched)
    normed, want_h = norm(x, res) if residual else (norm(x), x)
    assert torch.equal(h, want_h)
    want = F.linear(normed, layer.weight, layer.bias)
    assert ((y - want).abs().max() / want.abs().max()).item() < 1e-5


@interpreted
def test_choice_gives_norm_input_layers_a_norm_plan(monkeypatch):
    """choose_skinny_gemm times a `norm_input` layer's fusion against add_rmsnorm + the path
    it chose for the plain call; the timer charges 10 per launch, the skinny kernel 15 (so
    torch wins the plain call, 20 < 25 makes the fused norm win) and records it in
    `skinny_norm`; layers without the flag get none."""
    qkv, other = ColumnParallelLinear(32, 40), ColumnParallelLinear(32, 40)
    qkv.norm_input = True
    model = torch.nn.ModuleDict(dict(qkv=qkv, other=other)).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p)

    def time_us(fn) -> float:
        with count_launches() as counts:
            fn()
        return sum(15 if name.startswith("triton _skinny") else 10 for name in counts.elements())

    report = sk.choose_skinny_gemm(model, [1, 4], device_type="cpu", time_us=time_us)
    norm_rows = [r for r in report if "norm_fused" in r]
    assert len(norm_rows) == 2 and all(r["norm_pair_us"] == 20 and r["norm_fused_us"] == 15 for r in norm_rows)
    assert qkv.skinny == other.skinny == ((1, 0), (4, 0))
    assert all(split for _, split in qkv.skinny_norm) and other.skinny_norm == ()


@interpreted
def test_engine_decode_layer_launches_three_fewer_with_the_same_tokens(tmp_path):
    """A tiny Qwen3 (fp32) on the Triton backend, interpreted, with the down projections on
    the skinny kernel (SiLU-and-mul inside) and both norms of every layer in the qkv /
    gate_up kernels: greedy tokens equal the torch reference path's (which equals Hugging
    Face, tests/test_engine.py), a 150-token prompt decodes on split KV, and a decode step's
    decoder layer launches three kernels fewer than with every GEMM on torch: no
    silu_and_mul, no add_rmsnorm, one decode-attention launch."""
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
    layers = llm.model_runner.model.model.layers

    def plans(on: bool):
        for layer in layers:
            layer.mlp.down_proj.skinny_swiglu = ((64, 2),) if on else ()
            layer.self_attn.qkv_proj.skinny_norm = ((64, 2),) if on else ()
            layer.mlp.gate_up_proj.skinny_norm = ((64, 1),) if on else ()
    plans(True)
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    fused = decode_step_launches(llm, 1, 150)
    plans(False)
    unfused = decode_step_launches(llm, 1, 150)
    assert fused["decode_only"] and unfused["decode_only"]
    assert fused["layer"] == unfused["layer"] - 3
    assert not {"triton _silu_and_mul_kernel", "triton _add_rmsnorm_kernel"} & set(fused["layer_kernels"])
    assert unfused["layer_kernels"]["triton _silu_and_mul_kernel"] == 1
    assert unfused["layer_kernels"]["triton _add_rmsnorm_kernel"] == 2
    assert fused["layer_kernels"]["triton _decode_kernel"] == 1
