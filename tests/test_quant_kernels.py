"""The W4A16 kernels (engine.kernels.w4a16) under TRITON_INTERPRET=1 against the torch
dequantize reference: the decode (skinny, split-K reduced in-launch) kernel, the tiled
kernel and dequantize + matmul, for GPTQ (group 32, one group, act-order, asymmetric v2),
AWQ and a group size no K step divides, on the checkpoint layouts and on the load-time
repacked one; the one-row multiply-add (fma) kernel on the repacked layout; the repack
itself; the load-time choice with the dispatch that follows it; and sm_90 compiles."""
import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere

import pytest
import torch

# The kernels on CPU tensors under the Triton interpreter (what CI runs); compiled on a GPU
# they are checked by python benchmarks/bench_quant.py --stages layers,check.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU-interpreter tests (tensors on the CPU)")

from engine.checkpoint import quantization_config, quantize_rtn, quantized_tensors, tiny_config
from engine.kernels import skinny_gemm, w4a16
from engine.kernels.w4a16 import W4, Launch, w4a16_linear, w4a16_matmul
from engine.layers import quant as quant_layers
from engine.models import ModelConfig, build_model
from policy.quantization import QuantConfig

FORMATS = {   # name -> (quantization_config, K)
    "gptq": (quantization_config("gptq", 32), 128),
    "gptq-one-group": (quantization_config("gptq", -1, sym=False, checkpoint_format="gptq_v2"), 128),
    "gptq-act-order": (quantization_config("gptq", 32, desc_act=True), 128),
    "gptq-group-24": (quantization_config("gptq", 24), 96),    # per-row path: no K step divides 24
    "awq": (quantization_config("awq", 32), 128),
}
N = 48


def weight(name: str, seed: int = 2):
    """(W4 tensors, the reference dequantized W [N, K] fp32) of a random layer."""
    qc, k = FORMATS[name]
    q = QuantConfig.from_hf(qc)
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(N, k, generator=gen)
    perm = torch.randperm(k, generator=gen) if q.desc_act else None
    t = {key.rsplit(".", 1)[1]: v for key, v in quantized_tensors("x.weight", dense, q, perm).items()}
    w = W4(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), q.method == "awq",
           q.group_size, q.desc_act, q.zero_offset)
    return w, quantize_rtn(dense, q, perm)["weight"]


def inputs(rows: int, k: int, seed: int, dtype=torch.float32):
    """(x [rows, k], bias [N]) drawn from one seeded generator, x first, in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    return x, torch.randn(N, generator=gen).to(dtype)


def check(y, x, ref_w, bias, dtype, fp32_tol=1e-4):
    expected = x.float() @ ref_w.t() + bias.float()
    assert y.shape == expected.shape and y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=fp32_tol, atol=fp32_tol)
    else:   # bf16 x, bias and y: relative to the output's scale
        assert (y.float() - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("m,split,dtype", [(1, 1, torch.float32), (3, 2, torch.bfloat16),
                                           (16, 3, torch.float32), (64, 2, torch.bfloat16)])
def test_skinny_kernel_matches_the_reference(name, m, split, dtype):
    """Every M the decode regime has, split or not, bias added once, in fp32 and in bf16
    (bf16 runs the MAGIC dequantization: (q | 0x4300) read as bf16 is 128 + q)."""
    w, ref_w = weight(name)
    x, bias = inputs(m, ref_w.shape[1], m, dtype)
    y = w4a16_matmul(x, w, bias, Launch("skinny", 32, 64, 4, 2, split))
    check(y, x, ref_w, bias, dtype)


def test_split_k_counters_reset_between_calls():
    """The in-launch split-K reduction leaves its arrival counters at zero, so repeated calls
    (as graph replays do) on new inputs each give their own product."""
    w, ref_w = weight("awq")
    gen = torch.Generator().manual_seed(5)
    bias = torch.zeros(N)
    for _ in range(3):
        x = torch.randn(5, ref_w.shape[1], generator=gen)
        check(w4a16_matmul(x, w, bias, Launch("skinny", 16, 32, 4, 2, 4)), x, ref_w, bias, x.dtype)
        _, arrivals = skinny_gemm._WORKSPACES[x.device]
        assert not arrivals.any()


@pytest.mark.parametrize("name", ["gptq", "gptq-act-order", "gptq-group-24", "awq"])
@pytest.mark.parametrize("kind", ["tiled", "dequant"])
def test_prefill_paths_match_the_reference(name, kind):
    w, ref_w = weight(name)
    x, bias = inputs(70, ref_w.shape[1], 7)
    launch = Launch("tiled", 32, 32, 4, 2) if kind == "tiled" else Launch("dequant")
    check(w4a16_matmul(x, w, bias, launch), x, ref_w, bias, x.dtype)


def test_skinny_kernel_refuses_prefill_sized_inputs():
    w, _ = weight("gptq")
    with pytest.raises(ValueError, match="1..64 rows"):
        w4a16.w4a16_skinny(torch.zeros(65, 128), w, None, w4a16.SKINNY_TILES[64][0])


@pytest.fixture
def tiny_quantized_model():
    cfg = ModelConfig.from_hf({**tiny_config("llama"),
                               "quantization_config": quantization_config("gptq", 32)})
    model = build_model(cfg, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if getattr(layer, "quant", None) is not None:
            layer.qweight.random_(generator=gen)        # any bits are valid 4-bit weights
            layer.scales.uniform_(0.01, 0.02, generator=gen)
            layer.qzeros.fill_(0x77777777)
            layer.g_idx.copy_(torch.arange(layer.in_features) // 32)
    return model


def test_choice_records_the_fastest_launch_and_dispatch_follows_it(tiny_quantized_model, monkeypatch):
    """choose_w4a16 records the fastest candidate per (shape, M); w4a16_linear takes the
    entry of the smallest measured M >= its rows (the largest's above them) and gives the
    torch path's product; so does quant.linear, on the CPU too, once the layer has a plan."""
    model = tiny_quantized_model

    def time_us(fn, m, launch):   # GEMV at 1 row, the second skinny tile to 64, dequant above
        second = launch in [t._replace(split_k=launch.split_k) for t in (
            w4a16.SKINNY_TILES[16][1], w4a16.SKINNY_TILES[64][1])]
        return {"skinny": 1.0 if second else 2.0, "gemv": 0.8, "tiled": 1.0, "fma": 5.0,
                "dequant": 0.5 if m > 64 else 3.0}[launch.kind]
    report = w4a16.choose_w4a16(model, m_values=[1, 4, 128], time_us=time_us, verify=False)
    assert len(report) == 3 * len(w4a16.quantized_layers(model))
    expected = {1: "gemv", 4: "skinny256x64", 128: "dequant"}
    assert all(r["choice"].startswith(expected[r["m"]]) for r in report)
    layer = next(m for m in model.modules() if getattr(m, "quant", None) is not None)
    (m1, l1), (m4, l4), (m128, l128) = layer.w4a16
    assert (m1, m4, m128) == (1, 4, 128)
    assert l1.kind == "gemv" and l4._replace(split_k=0) == w4a16.SKINNY_TILES[16][1]
    assert l128.kind == "dequant" and w4a16._SCRATCH   # the dequant plan keeps its buffer

    ran, real = [], w4a16.w4a16_matmul
    monkeypatch.setattr(w4a16, "w4a16_matmul",
                        lambda x, w, b, launch: ran.append(launch.kind) or real(x, w, b, launch))
    gen = torch.Generator().manual_seed(1)
    for rows, kind in ((1, "gemv"), (2, "skinny"), (3, "skinny"), (100, "dequant"), (300, "dequant")):
        x = torch.randn(rows, layer.in_features, generator=gen)
        torch.testing.assert_close(w4a16_linear(layer, x, None),   # the torch reference path
                                   x @ quant_layers.dequantize(layer).t(), rtol=1e-4, atol=1e-4)
        assert ran[-1] == kind
        quant_layers.linear(layer, x, None)
        assert ran[-1] == kind


def test_choice_keeps_the_default_within_noise(tiny_quantized_model):
    """Candidates 0.5% faster than the default (the first tile at the rule's split; the
    tiled kernel above 64 rows) do not replace it, and a plan without the dequant path
    gives the scratch buffer back."""
    w4a16._SCRATCH.clear()

    def time_us(fn, m, launch):
        default = launch == w4a16.TILED or launch._replace(split_k=0) == w4a16.SKINNY_TILES[64][0]
        return 1.0 if default else 0.995
    w4a16.choose_w4a16(tiny_quantized_model, m_values=[64, 256], time_us=time_us, verify=False)
    layer = next(m for m in tiny_quantized_model.modules() if getattr(m, "quant", None) is not None)
    (_, l64), (_, l256) = layer.w4a16
    n, k = w4a16.weight_of(layer).shape
    assert l64 == w4a16.candidates(64, n, k, skinny_gemm.num_sms(torch.device("cpu")))[0]
    assert l256 == w4a16.TILED
    assert not w4a16._SCRATCH


@pytest.mark.parametrize("name", ["gptq", "gptq-act-order", "awq"])
@pytest.mark.parametrize("m,split,dtype", [(1, 1, torch.bfloat16), (2, 3, torch.float32)])
def test_gemv_variant_matches_the_reference(name, m, split, dtype):
    """The multiply-add form (fp32 128 + q from the mantissa bits) at 1 and 2 rows."""
    w, ref_w = weight(name)
    x, bias = inputs(m, ref_w.shape[1], m, dtype)
    y = w4a16_matmul(x, w, bias, Launch("gemv", 16, 32, 4, 2, split))
    check(y, x, ref_w, bias, dtype)
    with pytest.raises(ValueError, match="gemv kernel takes 1..2 rows"):
        w4a16_matmul(torch.zeros(3, ref_w.shape[1]), w, None, Launch("gemv", 16, 32))


# ---- the load-time repack and the kernels on it ----------------------------------------------
def tp_act_order_slice():
    """Rank 1 of 2 of a row-parallel act-order layer: half the input rows, all groups, so the
    rows' groups sorted are not group_size rows each (the repack keeps g_idx: per-row path)."""
    w, ref_w = weight("gptq-act-order")
    k = ref_w.shape[1]
    half = slice(k // 2, k)
    sliced = w._replace(qweight=w.qweight[k // 16:], g_idx=w.g_idx[half].contiguous())
    return sliced, ref_w[:, half]


REPACK_CASES = [*FORMATS, "tp-act-order"]


def case(name):
    return tp_act_order_slice() if name == "tp-act-order" else weight(name)


@pytest.mark.parametrize("name", REPACK_CASES)
def test_repack_keeps_every_weight(name):
    """The repacked tensors dequantize (by the layout's own reference) to the checkpoint's
    weights exactly; act-order rows come sorted by group with x's permutation, and the
    per-row g_idx stays only where the sorted groups are not whole."""
    w, ref_w = case(name)
    r = w4a16.repack(w)
    n, k = w.shape
    assert r.packing == w4a16.REPACKED and r.shape == (n, k) and r.qweight.shape == (k, n // 8)
    got = quant_layers.dequantize_repacked(r.qweight, r.qzeros, r.scales, r.g_idx, r.perm,
                                           r.group_size, r.zero_offset)
    assert torch.equal(got, ref_w)
    assert (r.perm is not None) == w.act_order
    assert r.act_order == (name == "tp-act-order")
    if r.perm is not None:
        assert sorted(r.perm.tolist()) == list(range(k))
    assert w4a16.repack(r) is r


@pytest.mark.parametrize("name", REPACK_CASES)
@pytest.mark.parametrize("dtype,split,block_n", [(torch.float32, 1, 64), (torch.bfloat16, 2, 32)])
def test_fma_kernel_matches_the_reference(name, dtype, split, block_n):
    """The one-row multiply-add kernel on repacked weights, split or not, masked tiles
    (N = 48 against 64- and 32-column tiles), bias once. fp32 within 3e-4: the float (128 + q) x
    products keep ~2^-24 of 128 |x| each, as the GEMV form's."""
    w, ref_w = case(name)
    r = w4a16.repack(w)
    x, bias = inputs(1, ref_w.shape[1], split, dtype)
    y = w4a16_matmul(x, r, bias, Launch("fma", block_n, 16, 1, 2, split))
    check(y, x, ref_w, bias, dtype, fp32_tol=3e-4)
    with pytest.raises(ValueError, match="fma kernel takes 1..1 rows"):
        w4a16_matmul(torch.zeros(2, ref_w.shape[1]), r, None, Launch("fma", 64, 16))
    with pytest.raises(ValueError, match="must be repacked"):
        w4a16_matmul(x, w, None, Launch("fma", 64, 16))


def odd_weight(method: str, group: int, n: int = 40, k: int = 160, seed: int = 5):
    """A layer whose N (40: five words) and K (160) no tile divides, and its reference W."""
    q = QuantConfig.from_hf(quantization_config(method, group))
    dense = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    t = {key.rsplit(".", 1)[1]: v for key, v in quantized_tensors("x.weight", dense, q).items()}
    w = W4(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), q.method == "awq",
           q.group_size, q.desc_act, q.zero_offset)
    return w, quantize_rtn(dense, q)["weight"]


STREAM_LAUNCHES = [   # (launch, split, dtype): per-thread group flushes; one group per program
    (Launch("stream", 64, 32, 1, 1), 1, torch.float32),
    (Launch("stream", 32, 32, 1, 1), 3, torch.bfloat16),
    (Launch("stream", 128, 16, 2, 1), 2, torch.float32),
    (Launch("stream", 64, 32, 1, 2), 4, torch.bfloat16),
    (Launch("stream", 128, 32, 1, 1, chain=True), 4, torch.bfloat16),   # 4 x 8-row loads
    (Launch("stream", 128, 32, 1, 1, chain=True), 1, torch.float32)]


@pytest.mark.parametrize("name", REPACK_CASES)
@pytest.mark.parametrize("launch,split,dtype", STREAM_LAUNCHES)
def test_stream_kernel_matches_the_reference(name, launch, split, dtype):
    """The streaming one-row kernel on repacked weights: masked column tiles (N = 48
    against 32- to 128-column tiles), split or not, zero and scale applied per thread at
    each group's end or once per program (4 splits of 128 rows: one 32-row group each),
    act-order through the permutation, bias once; weights whose groups no step divides
    (24-row groups, a tensor-parallel slice of act-order rows) are refused."""
    w, ref_w = case(name)
    r = w4a16.repack(w)
    x, bias = inputs(1, ref_w.shape[1], split, dtype)
    launch = launch._replace(split_k=split)
    if name in ("gptq-group-24", "tp-act-order"):
        assert not w4a16.stream_fits(r, launch, dtype)
        with pytest.raises(ValueError, match="stream kernel: needs a repacked weight"):
            w4a16_matmul(x, r, bias, launch)
        return
    check(w4a16_matmul(x, r, bias, launch), x, ref_w, bias, dtype, fp32_tol=3e-4)


@pytest.mark.parametrize("method,group,split", [("gptq", -1, 2), ("awq", 32, 5), ("gptq", 32, 1)])
def test_stream_kernel_on_odd_shapes(method, group, split):
    """N = 40 and K = 160 (a last split shorter than the others, a partly masked tile),
    one group over all K or 32-row groups; one row only, the checkpoint layout refused."""
    w, ref_w = odd_weight(method, group)
    r = w4a16.repack(w)
    launch = Launch("stream", 64, 32, 1, 1, split)
    for dtype in (torch.float32, torch.bfloat16):
        x, _ = inputs(1, ref_w.shape[1], split, dtype)
        y = w4a16_matmul(x, r, None, launch)
        expected = x.float() @ ref_w.t()
        tol = 3e-4 if dtype == torch.float32 else 2e-2 * expected.abs().max().item()
        torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="stream kernel takes 1 row"):
        w4a16_matmul(torch.zeros(2, ref_w.shape[1]), r, None, launch)
    with pytest.raises(ValueError, match="stream kernel: needs a repacked weight"):
        w4a16_matmul(torch.zeros(1, ref_w.shape[1]), w, None, launch)


def test_stream_split_counters_reset_between_calls():
    """The split epilogue's counters are back at zero after a call: a second call with
    other inputs gives its own product, not a stale sum."""
    w, ref_w = weight("awq")
    r = w4a16.repack(w)
    launch = Launch("stream", 32, 32, 1, 1, 4)
    for seed in (1, 2):
        x, bias = inputs(1, ref_w.shape[1], seed)
        check(w4a16_matmul(x, r, bias, launch), x, ref_w, bias, x.dtype, fp32_tol=3e-4)


@pytest.mark.parametrize("name", [*FORMATS])
@pytest.mark.parametrize("kind,m,split,dtype", [
    ("mma", 1, 1, torch.float32), ("mma", 5, 2, torch.bfloat16), ("mma", 20, 3, torch.float32),
    ("mma", 64, 1, torch.bfloat16), ("swap", 1, 1, torch.bfloat16), ("swap", 16, 3, torch.bfloat16),
    ("swap", 40, 2, torch.bfloat16)])
def test_mma_kernel_matches_the_reference(name, kind, m, split, dtype):
    """The tensor-core kernel on repacked weights (q - z exact in bf16, scale in fp32 after
    each step's product) and its swapped form (weights the MMA's wide operand, the scale
    folded into the bf16 tile), every decode M, split or not, act-order through the
    permutation; weights they cannot take (per-row groups, fp16 activations; fp32 ones for
    the swapped form, which rounds the scaled weights to bf16) are refused."""
    w, ref_w = weight(name)
    r = w4a16.repack(w)
    x, bias = inputs(m, ref_w.shape[1], m, dtype)
    launch = Launch(kind, 32, 32 if name != "gptq-group-24" else 8, 4, 2, split)
    if kind == "swap":
        assert not w4a16.mma_fits(r, 32, torch.float32, "swap")
        with pytest.raises(ValueError, match="swap kernel"):
            w4a16_matmul(x.float(), r, bias.float(), launch._replace(block_k=16))
    if name == "gptq-group-24":   # 24-row groups: no power-of-two step of >= 16 rows fits
        with pytest.raises(ValueError, match=f"{kind} kernel"):
            w4a16_matmul(x, r, bias, launch._replace(block_k=16))
        return
    check(w4a16_matmul(x, r, bias, launch), x, ref_w, bias, dtype)
    assert not w4a16.mma_fits(r, 32, torch.float16, kind)
    assert not w4a16.mma_fits(w4a16.repack(tp_act_order_slice()[0]), 32, torch.bfloat16, kind)


@pytest.mark.parametrize("name", [*FORMATS])
@pytest.mark.parametrize("m,split,dtype,block_n,block_m", [
    (1, 1, torch.float32, 32, 16), (5, 2, torch.bfloat16, 16, 16), (16, 3, torch.float32, 32, 16),
    (20, 1, torch.float32, 16, 16), (20, 2, torch.float32, 32, 32), (40, 2, torch.float32, 32, 32),
    (64, 3, torch.bfloat16, 32, 32), (64, 1, torch.float32, 16, 16)])
def test_slice_kernel_matches_the_reference(name, m, split, dtype, block_n, block_m):
    """The nibble-sliced tensor-core kernel on repacked weights (eight column slices per K
    step, zero and scale on each slice's fp32 product): every decode M in programs of 16 or
    32 rows (more rows: several programs per tile), split or not, N not a multiple of the
    tile, act-order through the permutation, bias added once; weights it cannot take
    (per-row groups, fp16 activations) and 64-row programs are refused."""
    w, ref_w = weight(name)
    r = w4a16.repack(w)
    x, bias = inputs(m, ref_w.shape[1], m, dtype)
    launch = Launch("slice", block_n, 32 if name != "gptq-group-24" else 8, 4, 2, split,
                    block_m=block_m)
    if name == "gptq-group-24":   # 24-row groups: no power-of-two step of >= 16 rows fits
        with pytest.raises(ValueError, match="slice kernel"):
            w4a16_matmul(x, r, bias, launch._replace(block_k=16))
        return
    # the sum-of-x form: s * (sum (128 + q) x - (128 + z) sum x) in fp32, a few ulp of 128 |x|
    check(w4a16_matmul(x, r, bias, launch), x, ref_w, bias, dtype, fp32_tol=3e-4)
    assert not w4a16.mma_fits(r, 32, torch.float16, "slice")
    with pytest.raises(ValueError, match="slice kernel"):
        w4a16_matmul(x.half(), r, bias.half(), launch)
    with pytest.raises(ValueError, match="block_m must be 16 or 32"):
        w4a16_matmul(x, r, bias, launch._replace(block_m=64))


def test_slice_candidates_by_rows():
    """The choice times 16-row slice programs up to 32 rows, 32-row ones above 16 rows, each
    at most two programs per tile."""
    w, _ = weight("gptq-one-group")   # K = 128 in one group: the tiles' K steps fit
    r = w4a16.repack(w)
    rows = {m: {l.block_m for l in w4a16.candidates(m, N, 128, 4, r) if l.kind == "slice"}
            for m in (1, 16, 17, 32, 33, 64)}
    assert rows == {1: {16}, 16: {16}, 17: {16, 32}, 32: {16, 32}, 33: {32}, 64: {32}}


def test_slice_split_counters_reset_between_calls():
    """Split-K with two-program tiles (33-64 rows): every (tile, row block) has its own
    counter, reset by its last split, so repeated calls on new inputs give their own product."""
    w, ref_w = weight("awq")
    r = w4a16.repack(w)
    gen = torch.Generator().manual_seed(6)
    bias = torch.zeros(N)
    for rows in (40, 3, 64):
        x = torch.randn(rows, ref_w.shape[1], generator=gen)
        check(w4a16_matmul(x, r, bias, Launch("slice", 16, 32, 4, 2, 4, block_m=32)), x, ref_w,
              bias, x.dtype, fp32_tol=3e-4)
        _, arrivals = skinny_gemm._WORKSPACES[x.device]
        assert not arrivals.any()


@pytest.mark.parametrize("name", REPACK_CASES)
@pytest.mark.parametrize("launch,m", [(Launch("skinny", 32, 64, 4, 2, 2), 5),
                                      (Launch("gemv", 16, 32, 4, 2, 3), 2),
                                      (Launch("tiled", 32, 32, 4, 2), 70), (Launch("dequant"), 70)])
def test_every_path_runs_on_the_repacked_layout(name, launch, m):
    """The checkpoint-layout kernels read the repacked one too (N-packed words in natural
    order, x through the act-order permutation), so one copy of the weights serves all."""
    w, ref_w = case(name)
    r = w4a16.repack(w)
    x, bias = inputs(m, ref_w.shape[1], m)
    check(w4a16_matmul(x, r, bias, launch), x, ref_w, bias, x.dtype)


def test_repack_layers_in_place_and_dispatch_follows(tiny_quantized_model):
    """quant.repack_layers swaps every layer's tensors for the repacked ones (same bytes:
    no second copy), the torch reference dequantizes them to the same weights, and the
    layer dispatch (fma at one row, skinny above) gives the torch path's product."""
    model = tiny_quantized_model
    layers = [m for m in model.modules() if getattr(m, "quant", None) is not None]
    before = [quant_layers.dequantize(layer) for layer in layers]
    nbytes = sum(p.nbytes for p in model.parameters())
    quant_layers.repack_layers(model)
    assert sum(p.nbytes for p in model.parameters()) == nbytes
    gen = torch.Generator().manual_seed(4)
    for layer, dense in zip(layers, before):
        assert torch.equal(quant_layers.dequantize(layer), dense)
        w = w4a16.weight_of(layer)
        assert w.packing == w4a16.REPACKED and w.qweight is layer.qweight
        layer.w4a16 = ((1, Launch("fma", 64, 16, 1, 2)), (64, w4a16.SKINNY_TILES[64][0]))
        for rows in (1, 3):
            x = torch.randn(rows, layer.in_features, generator=gen)
            torch.testing.assert_close(w4a16_linear(layer, x, None), x @ dense.t(),
                                       rtol=3e-4, atol=3e-4)


def test_choice_times_the_fma_kernel_on_repacked_weights(tiny_quantized_model):
    """After the repack, choose_w4a16 times the fma tiles at one row and records the
    fastest; above one row they are not candidates."""
    quant_layers.repack_layers(tiny_quantized_model)
    seen = set()

    def time_us(fn, m, launch):
        seen.add((m, launch.kind))
        return 0.5 if launch.kind == "fma" else 1.0
    report = w4a16.choose_w4a16(tiny_quantized_model, m_values=[1, 2], time_us=time_us,
                                verify=False)
    assert (1, "fma") in seen and (2, "fma") not in seen
    assert all(r["choice"].startswith("fma") == (r["m"] == 1) for r in report)


def test_choice_times_the_stream_kernel_at_one_row(tiny_quantized_model):
    """On repacked weights choose_w4a16 times the stream tiles at one row (at the rule's
    split and at one group per program among others) and records the fastest; above one
    row they are not candidates, and the dispatch runs the recorded launch."""
    quant_layers.repack_layers(tiny_quantized_model)
    seen = []

    def time_us(fn, m, launch):
        seen.append((m, launch))
        return 0.5 if launch.kind == "stream" else 1.0
    report = w4a16.choose_w4a16(tiny_quantized_model, m_values=[1, 2], time_us=time_us,
                                verify=False)
    streams = [launch for m, launch in seen if launch.kind == "stream"]
    assert streams and all(m == 1 for m, launch in seen if launch.kind == "stream")
    n, k = w4a16.weight_of(next(iter(w4a16.quantized_layers(tiny_quantized_model).values()))[0]).shape
    assert any(launch.split_k == k // 32 for launch in streams)   # one 32-row group per program
    assert all(r["choice"].startswith("stream") == (r["m"] == 1) for r in report)
    layer = next(m for m in tiny_quantized_model.modules() if getattr(m, "quant", None) is not None)
    assert layer.w4a16[0][1].kind == "stream"
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(w4a16_linear(layer, x, None), quant_layers.linear(layer, x, None),
                               rtol=3e-4, atol=3e-4)


def test_choice_times_small_row_counts_with_pdl_as_steps_run_them(tiny_quantized_model, monkeypatch):
    """With pdl_rows (the engine's pdl_max_tokens), M <= pdl_rows are timed with
    programmatic dependent launch on and larger M with it off, as the step's graphs launch
    them; the switch is back as it was afterwards. Where PDL is not supported (this CPU) it
    stays off."""
    from engine.kernels import pdl
    seen = {}

    def time_us(fn, m, launch):
        seen.setdefault(m, set()).add(pdl.enabled())
        return 1.0
    report = w4a16.choose_w4a16(tiny_quantized_model, m_values=[1, 4, 128], time_us=time_us,
                                verify=False, pdl_rows=4)
    assert seen == {1: {False}, 4: {False}, 128: {False}} and not any(r["pdl"] for r in report)
    monkeypatch.setattr(pdl, "supported", lambda device: True)
    seen.clear()
    report = w4a16.choose_w4a16(tiny_quantized_model, m_values=[1, 4, 128], time_us=time_us,
                                verify=False, pdl_rows=4)
    assert seen == {1: {True}, 4: {True}, 128: {False}} and not pdl.enabled()
    assert {r["m"]: r["pdl"] for r in report} == {1: True, 4: True, 128: False}


def test_choice_retimes_the_fastest_without_the_prefetch_and_without_pdl(tiny_quantized_model,
                                                                           monkeypatch):
    """Where the engine launches with PDL, the three fastest PDL launches (weight prefetch
    on) are timed again with the prefetch off and with PDL off; the plan keeps the mode
    that won, and w4a16_linear launches it so."""
    from engine.kernels import pdl
    quant_layers.repack_layers(tiny_quantized_model)
    monkeypatch.setattr(pdl, "supported", lambda device: True)
    seen = []

    def time_us(fn, m, launch):   # streams fastest; without PDL faster still
        seen.append(launch)
        return {w4a16.PDL_OFF: 0.5, w4a16.PDL_WAIT: 0.8}.get(launch.pdl, 1.0) if launch.kind == "stream" else 2.0
    report = w4a16.choose_w4a16(tiny_quantized_model, m_values=[1], time_us=time_us,
                                verify=False, pdl_rows=1)
    again = [l for l in seen if l.pdl != w4a16.PDL_PREFETCH]
    assert again and all(l.kind == "stream" for l in again)
    assert len(again) == 2 * 3 * len(report)   # the three fastest, in two modes, per shape
    assert all(r["choice"].endswith("/nopdl") for r in report)
    layer = next(m for m in tiny_quantized_model.modules() if getattr(m, "quant", None) is not None)
    assert layer.w4a16[0][1].pdl == w4a16.PDL_OFF
    w, chosen = w4a16.weight_of(layer), layer.w4a16[0][1]
    pdl.enable(True)   # as in a decode step: each mode's launch arguments
    try:
        modes = {mode: w4a16._pdl_args(w, True, chosen._replace(pdl=mode))
                 for mode in (w4a16.PDL_OFF, w4a16.PDL_WAIT, w4a16.PDL_PREFETCH)}
    finally:
        pdl.enable(False)
    assert modes[w4a16.PDL_OFF] == dict(PDL=False, PREFETCH=False)
    assert modes[w4a16.PDL_WAIT] == dict(PDL=True, PREFETCH=False, launch_pdl=True)
    assert modes[w4a16.PDL_PREFETCH] == dict(PDL=True, PREFETCH=True, launch_pdl=True)


def test_choice_never_takes_a_wrong_product(tiny_quantized_model, monkeypatch):
    """A candidate whose product is off (here: the fma kernel made to return zeros) is
    reported under `failed` and not chosen, however fast; the right ones pass the check."""
    quant_layers.repack_layers(tiny_quantized_model)
    real = w4a16.w4a16_matmul
    monkeypatch.setattr(w4a16, "w4a16_matmul", lambda x, w, b, launch: (
        real(x, w, b, launch).zero_() if launch.kind == "fma" else real(x, w, b, launch)))
    monkeypatch.setattr(w4a16, "candidates", lambda m, n, k, sms, w=None, dtype=None: [
        w4a16.SKINNY_TILES[16][0], w4a16.FMA_TILES[0], Launch("dequant")])
    report = w4a16.choose_w4a16(tiny_quantized_model, m_values=[1],
                                time_us=lambda fn, m, launch: 0.1 if launch.kind == "fma" else 1.0)
    assert report and all(r["choice"].startswith("skinny") for r in report)
    assert all("wrong product" in r["failed"][w4a16._name(w4a16.FMA_TILES[0])] for r in report)
    assert all(len(r["times_us"]) == 2 for r in report)


# ---- the kernels compile for the H200 (sm_90) without a GPU ----------------------------------
SM90_SHARED = 232448   # bytes of shared memory an sm_90 program may use
COMPILE_SM90 = """
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels import w4a16
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
out = []
for kind, awq, bm, bn, bk, warps, stages in json.loads(sys.argv[1]):
    sig = {a: "*i32" for a in ("qweight_ptr", "qzeros_ptr", "g_idx_ptr", "perm_ptr", "arrivals_ptr")}
    sig.update(x_ptr="*bf16", scales_ptr="*fp16", bias_ptr="*bf16", y_ptr="*bf16", partial_ptr="*fp32")
    if kind in ("mma", "swap", "slice"):
        fn = {"swap": w4a16._w4a16_swap_kernel, "slice": w4a16._w4a16_slice_kernel}.get(
            kind, w4a16._w4a16_mma_kernel)
        del sig["g_idx_ptr"]
        sig.update({a: "i32" for a in ("M", "N", "K", "stride_xm", "stride_ym", "k_per_split",
                                       "group_size", "zero_offset")})
        if kind == "slice":
            sig["m_blocks"] = "i32"
        const = dict(HAS_PERM=awq == 2, HAS_BIAS=True, SPLIT=True, IEEE=False, EVEN_K=True,
                     EVEN_N=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=stages,
                     PDL=kind != "mma", PREFETCH=kind != "mma")
    elif kind in ("stream", "streamc"):   # bm: 1 = one group per program, 0 = per-thread
        # group flushes; streamc: the FMA-chain form
        fn = w4a16._w4a16_stream_kernel
        del sig["g_idx_ptr"]
        sig.update({a: "i32" for a in ("N", "K", "stride_w", "k_per_split", "group_size",
                                       "zero_offset", "lo", "hi")})
        tile = w4a16.Launch("stream", bn, bk, warps, stages)
        const = dict(HAS_PERM=awq == 2, HAS_BIAS=True, SPLIT=True, ONE_GROUP=bm == 1,
                     PRECISE=False, EVEN_K=True, EVEN_N=True, BLOCK_N=bn,
                     ROWS=w4a16.stream_rows(tile), STEP=bk, RCHUNK=4, NUM_STAGES=stages,
                     PDL=True, PREFETCH=True, CHAIN=kind == "streamc")   # as decode steps launch it
    elif kind == "fma":
        fn = w4a16._w4a16_fma_kernel
        sig.update({a: "i32" for a in ("N", "K", "k_per_split", "group_size", "zero_offset", "lo", "hi")})
        const = dict(PER_ROW=False, ACT_ORDER=False, HAS_PERM=awq == 2, HAS_BIAS=True, SPLIT=True,
                     PRECISE=False, EVEN_K=True, EVEN_N=True, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=stages)
    else:
        fn = w4a16._w4a16_skinny_kernel
        sig.update({a: "i32" for a in ("M", "N", "K", "stride_xm", "stride_ym", "k_per_split",
                                       "group_size", "zero_offset")})
        const = dict(AWQ=awq, PER_ROW=False, ACT_ORDER=False, HAS_PERM=False, MAGIC=0x4300,
                     MAGIC_VALUE=128, IEEE=False, HAS_BIAS=True, SPLIT=True, DOT=kind == "skinny",
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=stages)
    sig.update({name: "constexpr" for name in const})
    # as a launch specializes them: pointers 16-byte aligned, Llama's sizes multiples of 16
    aligned = [i for i, (a, t) in enumerate(sig.items()) if t.startswith("*") or a in (
        "N", "K", "stride_w", "stride_xm", "stride_ym", "k_per_split", "group_size")
        ] if kind.startswith("stream") or kind == "slice" else []
    src = ASTSource(fn=fn, signature=sig, constexprs=const,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    path = os.path.join(tempfile.mkdtemp(), "k.cubin")
    open(path, "wb").write(c.asm["cubin"])
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path],
                           capture_output=True, text=True, check=True).stdout
    ptx = c.asm["ptx"]
    out.append(dict(shared=c.metadata.shared, ttgir=c.asm["ttgir"],
                    wide_loads=ptx.count("ld.global.v4.b32") + ptx.count("cp.async.cg.shared.global"),
                    pdl=ptx.count("griddepcontrol.wait"), l2_prefetch=ptx.count("cp.async.bulk.prefetch"),
                    regs=int(re.search(r"REG:(\\d+)", usage).group(1)),
                    stack=int(usage.split("STACK:")[1].split()[0])))
print(json.dumps(out))
"""


def sm90_compile(variants):
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", COMPILE_SM90, json.dumps(variants)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


needs_ptxas = pytest.mark.skipif(
    not os.path.exists(os.path.join(os.path.dirname(__import__("triton").__file__), "backends",
                                    "nvidia", "bin", "ptxas")), reason="triton's ptxas is not installed")


@needs_ptxas
def test_decode_variants_compile_for_sm90_and_fit():
    """The default decode launches compile ahead of time for sm_90 (bf16 activations, GPTQ,
    AWQ and repacked words, split-K; a fresh interpreter without TRITON_INTERPRET), fit its
    shared memory, keep their weight loads software-pipelined (async copies), spill no
    registers, and the MMA form runs on wgmma; so do the fma and mma tiles on repacked weights
    (half of them with the x permutation), and the stream tiles, whose weight loads are
    16 bytes wide (ld.global.v4, or 16-byte async copies where pipelined); the stream and
    swap and slice tiles as decode steps launch them on sm_90 (programmatic dependent launch:
    one wait, the weight slice prefetched into L2 before it); the slice tiles on mma.v2 with
    their dequantized slices made in registers in the MMA operand's layout (no slice stored
    to shared memory or converted)."""
    tiles = [("skinny", False, 16, w4a16.SKINNY_TILES[16][0]), ("skinny", 1, 16, w4a16.SKINNY_TILES[16][1]),
             ("skinny", 2, 64, w4a16.SKINNY_TILES[64][0]), ("skinny", False, 64, w4a16.SKINNY_TILES[64][1]),
             ("gemv", 1, 1, w4a16.GEMV), ("gemv", 2, 2, w4a16.GEMV)]
    tiles += [("fma", 2 * (i % 2), 1, t) for i, t in enumerate(w4a16.FMA_TILES)]
    tiles += [("mma", 2 * (i % 2), bm, t) for bm in (16, 64) for i, t in enumerate(w4a16.MMA_TILES[bm])]
    tiles += [("stream", 2 * (i % 2), (i // 2) % 2, t) for i, t in enumerate(w4a16.STREAM_TILES)]
    tiles += [("streamc", 0, 1, t) for t in w4a16.STREAM_TILES
              if t.block_k == 4 * w4a16.stream_rows(t)]
    tiles += [("swap", 2 * (i % 2), bm, t) for bm in (16, 64) for i, t in enumerate(w4a16.SWAP_TILES[bm])]
    tiles += [("slice", 2 * (i % 2) * (t.block_m == 16), t.block_m, t)   # (x permuted at 32
              for i, t in enumerate(w4a16.SLICE_TILES)]                     # rows: a few spills)
    variants = [(kind, awq, bm, t.block_n, t.block_k, t.num_warps, t.num_stages)
                for kind, awq, bm, t in tiles]
    for (kind, _, _, bn, bk, warps, stages), c in zip(variants, sm90_compile(variants)):
        assert 0 < c["shared"] <= SM90_SHARED, (kind, c["shared"])
        assert c["stack"] == 0, (kind, "spills registers")
        if kind in ("stream", "streamc", "swap", "slice"):   # programmatic dependent launch, prefetch
            assert c["pdl"] >= 1 and c["l2_prefetch"] >= 1, (kind, c["pdl"], c["l2_prefetch"])
        if kind in ("stream", "streamc"):   # each step's loads 16 bytes wide, issued before use
            loads = bk // w4a16.stream_rows(Launch("stream", bn, bk, warps))
            assert c["wide_loads"] >= (loads if stages == 1 else 1), (bn, bk, c["wide_loads"])
            assert ("async_copy_global_to_local" in c["ttgir"]) == (stages > 1)
            continue
        assert "async_copy_global_to_local" in c["ttgir"], kind
        if kind == "slice":   # mma.v2, the slices made in registers, never stored back
            assert "warp_group_dot" not in c["ttgir"]
            slice_tile = re.compile(rf"(local_alloc|convert_layout) %\S+ : \(?tensor<{bk}x{bn // 8}xbf16")
            assert not slice_tile.search(c["ttgir"]), "a dequantized slice moved through shared memory"
        elif kind == "swap":   # wgmma at every BLOCK_M, its A operand (the weights) in registers
            assert "warp_group_dot" in c["ttgir"] and "dot_op<{opIdx = 0" in c["ttgir"]
        elif kind != "mma":   # the mma kernel: wgmma at BLOCK_M 64, mma.v2 at 16
            assert ("warp_group_dot" in c["ttgir"]) == (kind == "skinny"), kind
        assert c["stack"] == 0, (kind, "spills registers")
        assert c["regs"] <= 255
