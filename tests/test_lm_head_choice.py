"""The skinny-GEMM load-time choice times each row count under the launch the step's CUDA
graphs give it: programmatic dependent launch (weight prefetch included) up to the engine's
pdl_max_tokens rows, plain launches above, and the caller's PDL switch restored after. The LM
head is one such layer: timed with PDL off, its choice did not hold in the graph (issue 9)."""
import torch
import torch.nn.functional as F

import engine.kernels.skinny_gemm as sk
from engine.kernels import pdl
from engine.layers.embed_head import ParallelLMHead
from engine.layers.linear import ColumnParallelLinear


def test_choice_times_each_row_count_with_the_graphs_pdl(monkeypatch):
    """Fake timings that depend on the launch: with PDL the kernel is slower than cuBLAS for
    the LM head's shape, without it faster. The plan follows the launch each M gets: cuBLAS
    up to pdl_rows, the kernel above; the report says which launch each row was timed with."""
    model = torch.nn.ModuleDict(dict(head=ParallelLMHead(64, 32), col=ColumnParallelLinear(32, 48)))
    model.to(torch.bfloat16)
    monkeypatch.setattr(pdl, "supported", lambda device: True)   # as on an sm_90 GPU
    seen = []

    def linear(x, weight, bias=None):
        seen.append(("torch", x.shape[0], pdl.enabled()))
        return torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype)

    def gemm(x, weight, bias=None, split_k=None, config=None, swiglu=False):
        seen.append(("kernel", x.shape[0], pdl.enabled()))
        return torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype)

    def time_us(fn) -> float:
        seen.clear()
        fn()
        kind, _, on = seen[0]
        return 10.0 if kind == "torch" else (12.0 if on else 8.0)

    monkeypatch.setattr(F, "linear", linear)
    monkeypatch.setattr(sk, "skinny_gemm", gemm)
    pdl.enable(False)
    report = sk.choose_skinny_gemm(model, [1, 8, 32, 48], device_type="cpu", time_us=time_us, pdl_rows=32)
    assert not pdl.enabled()                                   # the caller's switch, restored
    for layer in model.values():
        assert [split > 0 for _, split in layer.skinny] == [False, False, False, True]
    assert [(r["m"], r["pdl"]) for r in report if r["n"] == 64] == [(1, True), (8, True), (32, True), (48, False)]
    pdl.enable(True)
    sk.choose_skinny_gemm(model, [1], device_type="cpu", time_us=time_us, pdl_rows=0)
    assert pdl.enabled() and model["head"].skinny[0][1] > 0    # all timed without PDL: the kernel
    pdl.enable(False)
