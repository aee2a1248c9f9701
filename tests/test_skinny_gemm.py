"""The skinny GEMM (engine/kernels/skinny_gemm.py) on the Triton interpreter: equal to torch's
matmul for shapes off the tiles, with and without bias and split-K; the split-K reduction
leaves its workspace ready for the next call; the layers' dispatch follows the measured plan
and stays on torch on the CPU."""
import json

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import skinny_gemm as sk
from engine.layers.embed_head import ParallelLMHead
from engine.layers.linear import ColumnParallelLinear, RowParallelLinear, dense_linear

# max |y - ref| / max |ref|: fp32 accumulates in fp32 (IEEE dots); bf16 / fp16 round the
# output once (2^-8 / 2^-11 relative) after an fp32 accumulation
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k, split_k, bias", [
    (1, 77, 150, 1, False),     # nothing a multiple of a tile
    (3, 130, 300, 3, True),     # split-K, two N tiles, bias
    (17, 70, 513, 4, True),     # BLOCK_M 32, a ragged last split
    (64, 65, 129, 2, False),    # the largest M
])
def test_equals_torch(dtype, m, n, k, split_k, bias):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    y = sk.skinny_gemm(x, w, b, split_k)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert rel_err(y, ref) < TOLERANCE[dtype]


def test_split_k_is_deterministic_and_leaves_counters_at_zero():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 1000, generator=gen), torch.randn(150, 1000, generator=gen)
    splits = sk.launch_config(5, 150, 1000, 4, 132)["splits"]
    assert splits == 4
    first = sk.skinny_gemm(x, w, None, 4)
    _, arrivals = sk._WORKSPACES[x.device]
    assert not arrivals.any()                       # reset by each tile's last split
    assert torch.equal(sk.skinny_gemm(x, w, None, 4), first)   # partials summed in split order
    unsplit = sk.skinny_gemm(x, w, None, 1)
    assert rel_err(first, unsplit.float()) < 1e-5


def test_split_rule_splits_narrow_outputs_only():
    # Qwen3-0.6B on 132 SMs: o_proj (N 1024) is split, the LM head (N 151936) is not
    assert sk.default_split_k(1024, 2048, 132) > 1
    assert sk.default_split_k(151936, 1024, 132) == 1
    for n, k in [(1024, 2048), (4096, 1024), (1024, 3072)]:
        cfg = sk.launch_config(1, n, k, None, 132)
        assert cfg["splits"] * cfg["k_per_split"] >= k > (cfg["splits"] - 1) * cfg["k_per_split"]
        assert cfg["k_per_split"] % cfg["BLOCK_K"] == 0


def test_leading_dims_and_bad_input():
    x, w = torch.randn(2, 3, 40), torch.randn(24, 40)
    y = sk.skinny_linear(x, w, None)
    assert y.shape == (2, 3, 24)
    assert rel_err(y, F.linear(x, w)) < 1e-5
    with pytest.raises(ValueError, match="1..64 rows"):
        sk.skinny_gemm(torch.randn(65, 40), w)
    with pytest.raises(ValueError, match="share a dtype"):
        sk.skinny_gemm(torch.randn(2, 40).half(), w)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        sk.skinny_gemm(torch.randn(2, 41), w)


def test_dense_linear_follows_the_plan(monkeypatch):
    calls = []

    def spy(x, weight, bias, split_k=None):
        calls.append((x.shape[0], split_k))
        return F.linear(x, weight, bias)

    monkeypatch.setattr(sk, "skinny_linear", spy)
    w = torch.randn(8, 16)
    plan = ((1, 4), (4, 0), (16, 2))   # kernel at 1 row, torch at 2-4, kernel at 5-16
    for rows in (1, 3, 4, 9, 16, 17):
        y = dense_linear(torch.randn(rows, 16), w, None, plan)
        assert y.shape == (rows, 8)
    assert calls == [(1, 4), (9, 2), (16, 2)]
    calls.clear()
    dense_linear(torch.randn(3, 16), w, None, ())   # no plan: torch
    assert calls == []


def test_choice_on_cpu_leaves_torch_path():
    """No measurement runs off CUDA: the layers keep an empty plan, outputs are F.linear's."""
    model = torch.nn.ModuleDict(dict(
        col=ColumnParallelLinear(16, 24, bias=True), row=RowParallelLinear(24, 16),
        head=ParallelLMHead(40, 16)))
    for p in model.parameters():
        torch.nn.init.normal_(p)
    assert sk.choose_skinny_gemm(model) == []
    assert all(layer.skinny == () for layer in model.values())
    x = torch.randn(3, 16)
    assert torch.equal(model["col"](x), F.linear(x, model["col"].weight, model["col"].bias))
    assert torch.equal(model["head"](x), F.linear(x, model["head"].weight))


def test_choice_takes_the_faster_path_per_shape(monkeypatch):
    """The measurement groups layers by shape, times both paths (each kernel split) and
    records per M whether, and at which split, the kernel won. The timer charges fixed costs
    per call (torch 10, the kernel 50 minus a hair per split), except that torch costs 100
    for o_proj's shape: only o_proj takes the kernel, at its largest split."""
    model = torch.nn.ModuleDict(dict(
        a=ColumnParallelLinear(32, 40), b=ColumnParallelLinear(32, 40),
        o=RowParallelLinear(300, 24), head=ParallelLMHead(48, 32)))
    model.to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    groups = sk.skinny_layers(model, "cpu")
    assert sorted(len(g) for g in groups.values()) == [1, 1, 2]   # a and b share a shape
    slow = model["o"].weight.shape
    calls = []
    real_linear, real_gemm = F.linear, sk.skinny_gemm

    def linear(x, weight, bias=None):
        calls.append(100 if weight.shape == slow else 10)
        return real_linear(x, weight, bias)

    def gemm(x, weight, bias=None, split_k=None, config=None, swiglu=False):
        calls.append(50 - 0.1 * split_k)
        return real_gemm(x, weight, bias, split_k, config, swiglu)   # runs: every split is exercised

    def time_us(fn) -> float:
        calls.clear()
        fn()
        return sum(calls)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    monkeypatch.setattr(sk, "skinny_gemm", gemm)
    report = sk.choose_skinny_gemm(model, [1, 3], device_type="cpu", time_us=time_us)
    assert len(report) == 3 * 2
    top = max(sk.split_candidates(24, 300, 132))
    assert model["o"].skinny == ((1, top), (3, top))
    for name in ("a", "b", "head"):
        assert model[name].skinny == ((1, 0), (3, 0))
    assert [r["skinny"] for r in report if r["n"] == 24] == [True, True]
    x = torch.randn(2, 300).to(torch.bfloat16)   # 2 rows: the M=3 entry, the kernel
    calls.clear()
    y = model["o"](x)
    assert calls == [50 - 0.1 * top]
    assert rel_err(y, real_linear(x.float(), model["o"].weight.float())) < TOLERANCE[torch.bfloat16]


def test_engine_config_switch(tmp_path):
    from engine.config import EngineConfig
    (tmp_path / "config.json").write_text("{}")   # EngineConfig checks the directory only
    assert EngineConfig(str(tmp_path)).skinny_gemm is True
    assert EngineConfig(str(tmp_path), skinny_gemm=False).skinny_gemm is False
    with pytest.raises(ValueError, match="skinny_gemm"):
        EngineConfig(str(tmp_path), skinny_gemm="no")


def test_bench_smoke(capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_gemm
    bench_gemm.main(["--smoke"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["bench"] == "gemm" and result["rows"]
    assert {r["m"] for r in result["rows"]} == set(bench_gemm.SMOKE_MS)
    assert max(r["err"] for r in result["rows"]) < 2e-2


def test_engine_tokens_unchanged_on_the_kernel(tmp_path, monkeypatch):
    """A tiny Qwen3 on the CPU (fp32: the kernel's dots are IEEE there), every linear layer
    and the LM head routed to the kernel at <= 64 rows (split-K 2), generates the tokens the
    torch path does; the 70-token prompt's prefill step (> 64 rows) stays on torch."""
    from engine import LLM, SamplingParams
    from engine.checkpoint import tiny_config, write_random_checkpoint
    path = write_random_checkpoint(tiny_config("qwen3"), tmp_path / "qwen3", dtype="float32",
                                   std=0.3, progress=False)
    prompts = [[(7 * i + 3 * j) % 500 + 3 for j in range(n)] for i, n in enumerate((5, 70, 12))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(str(path), device="cpu", dtype="float32", attention_backend="torch",
              num_gpu_blocks=64, max_model_len=128)
    want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    routed = [m for m in llm.model_runner.model.modules() if hasattr(m, "skinny")]
    assert len(routed) == 2 * 4 + 1   # 2 layers x (qkv, o, gate_up, down) + LM head
    for module in routed:
        module.skinny = ((64, 2),)
    rows, shapes, real = [], set(), sk.skinny_linear

    def spy(x, weight, bias, split_k=None):
        rows.append(x.numel() // x.shape[-1])
        shapes.add(tuple(weight.shape))
        return real(x, weight, bias, split_k)

    monkeypatch.setattr(sk, "skinny_linear", spy)
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    assert shapes == {tuple(m.weight.shape) for m in routed} and max(rows) <= 64
