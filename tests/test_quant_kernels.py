"""The W4A16 kernels (engine.kernels.w4a16) under TRITON_INTERPRET=1 against the torch
dequantize reference: the decode (skinny, split-K reduced in-launch) kernel, the tiled
kernel and dequantize + matmul, for GPTQ (group 32, one group, act-order, asymmetric v2),
AWQ and a group size no K step divides; and the load-time choice with the dispatch that
follows it."""
import os

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


def check(y, x, ref_w, bias, dtype):
    expected = x.float() @ ref_w.t() + bias.float()
    assert y.shape == expected.shape and y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    else:   # bf16 x, bias and y: relative to the output's scale
        assert (y.float() - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("m,split,dtype", [(1, 1, torch.float32), (3, 2, torch.bfloat16),
                                           (16, 3, torch.float32), (64, 2, torch.bfloat16)])
def test_skinny_kernel_matches_the_reference(name, m, split, dtype):
    """Every M the decode regime has, split or not, bias added once, in fp32 and in bf16
    (bf16 runs the MAGIC dequantization: (q | 0x4300) read as bf16 is 128 + q)."""
    w, ref_w = weight(name)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, ref_w.shape[1], generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
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
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(70, ref_w.shape[1], generator=gen)
    bias = torch.randn(N, generator=gen)
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
    torch path's product."""
    model = tiny_quantized_model

    def time_us(fn, m, launch):   # GEMV at 1 row, the second skinny tile to 64, dequant above
        second = launch in [t._replace(split_k=launch.split_k) for t in (
            w4a16.SKINNY_TILES[16][1], w4a16.SKINNY_TILES[64][1])]
        return {"skinny": 1.0 if second else 2.0, "gemv": 0.8, "tiled": 1.0,
                "dequant": 0.5 if m > 64 else 3.0}[launch.kind]
    report = w4a16.choose_w4a16(model, m_values=[1, 4, 128], time_us=time_us)
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
        torch.testing.assert_close(w4a16_linear(layer, x, None),
                                   quant_layers.linear(layer, x, None), rtol=1e-4, atol=1e-4)
        assert ran[-1] == kind


def test_choice_keeps_the_default_within_noise(tiny_quantized_model):
    """Candidates 0.5% faster than the default (the first tile at the rule's split; the
    tiled kernel above 64 rows) do not replace it, and a plan without the dequant path
    gives the scratch buffer back."""
    w4a16._SCRATCH.clear()

    def time_us(fn, m, launch):
        default = launch == w4a16.TILED or launch._replace(split_k=0) == w4a16.SKINNY_TILES[64][0]
        return 1.0 if default else 0.995
    w4a16.choose_w4a16(tiny_quantized_model, m_values=[64, 256], time_us=time_us)
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
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, ref_w.shape[1], generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    y = w4a16_matmul(x, w, bias, Launch("gemv", 16, 32, 4, 2, split))
    check(y, x, ref_w, bias, dtype)
    with pytest.raises(ValueError, match="gemv kernel takes 1..2 rows"):
        w4a16_matmul(torch.zeros(3, ref_w.shape[1]), w, None, Launch("gemv", 16, 32))


# ---- the kernels compile for the H200 (sm_90) without a GPU ----------------------------------
SM90_SHARED = 232448   # bytes of shared memory an sm_90 program may use
COMPILE_SM90 = """
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels import w4a16
out = []
for kind, awq, bm in json.loads(sys.argv[1]):
    launch = w4a16.GEMV if kind == "gemv" else w4a16.SKINNY_TILES[bm][kind == "skinny2"]
    sig = {a: "*i32" for a in ("qweight_ptr", "qzeros_ptr", "g_idx_ptr", "arrivals_ptr")}
    sig.update(x_ptr="*bf16", scales_ptr="*fp16", bias_ptr="*bf16", y_ptr="*bf16", partial_ptr="*fp32")
    sig.update({a: "i32" for a in ("M", "N", "K", "stride_xm", "stride_ym", "k_per_split",
                                   "group_size", "zero_offset")})
    const = dict(AWQ=awq, PER_ROW=False, ACT_ORDER=False, MAGIC=0x4300, MAGIC_VALUE=128, IEEE=False,
                 HAS_BIAS=True, SPLIT=True, DOT=launch.kind == "skinny", BLOCK_M=bm,
                 BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, NUM_STAGES=launch.num_stages)
    sig.update({name: "constexpr" for name in const})
    src = ASTSource(fn=w4a16._w4a16_skinny_kernel, signature=sig, constexprs=const)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": launch.num_warps})
    path = os.path.join(tempfile.mkdtemp(), "k.cubin")
    open(path, "wb").write(c.asm["cubin"])
    usage = subprocess.run([os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                         "bin", "cuobjdump"), "--dump-resource-usage", path],
                           capture_output=True, text=True, check=True).stdout
    out.append(dict(shared=c.metadata.shared, ttgir=c.asm["ttgir"],
                    stack=int(usage.split("STACK:")[1].split()[0])))
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__import__("triton").__file__),
                                                    "backends", "nvidia", "bin", "ptxas")),
                    reason="triton's ptxas is not installed")
def test_decode_variants_compile_for_sm90_and_fit():
    """The default decode launches compile ahead of time for sm_90 (bf16 activations, GPTQ and
    AWQ, split-K; a fresh interpreter without TRITON_INTERPRET), fit its shared memory, keep
    their weight loads software-pipelined (async copies), spill no registers, and the MMA
    form runs on wgmma."""
    import json
    import subprocess
    import sys
    variants = [("skinny", False, 16), ("skinny2", True, 16), ("skinny", True, 64),
                ("skinny2", False, 64), ("gemv", True, 1), ("gemv", False, 2)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", COMPILE_SM90, json.dumps(variants)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for (kind, _, _), c in zip(variants, json.loads(done.stdout.splitlines()[-1])):
        assert 0 < c["shared"] <= SM90_SHARED, (kind, c["shared"])
        assert "async_copy_global_to_local" in c["ttgir"], kind
        assert ("warp_group_dot" in c["ttgir"]) == kind.startswith("skinny"), kind
        assert c["stack"] == 0, (kind, "spills registers")
