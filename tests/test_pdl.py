"""Programmatic dependent launch (engine.kernels.pdl): every Triton kernel of a decode step
compiles for sm_90 with PDL on, waits for the previous kernel before any load of what it
produced, and prefetches only weights / KV pages (and reads only step inputs) before that
wait; with PDL off the same kernels carry none of it. Compiled ahead of time here (no GPU):
the interpreter has no grid-dependency control, and the H200 run checks the numbers
(benchmarks/check_gpu.py, tests/test_kernels.py compiled)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPILE = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
fused, pa, sample, sg = (importlib.import_module("engine.kernels." + m) for m in ("fused", "paged_attention", "sample", "skinny_gemm"))

def compile_(fn, sig, const, warps=4, stages=3):
    sig = dict(sig); sig.update({k: "constexpr" for k in const})
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    return c.asm["ptx"]

def kernels(on):
    out = {}
    ptr = lambda names, t="*bf16": {n: t for n in names}
    i32 = lambda names: {n: "i32" for n in names}
    sig = ptr(["x_ptr", "w_ptr", "bias_ptr", "y_ptr", "res_ptr", "norm_w_ptr", "res_out_ptr"])
    sig.update(partial_ptr="*fp32", arrivals_ptr="*i32", eps="fp32")
    sig.update(i32(["M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "stride_rm", "stride_om", "k_per_split"]))
    order = ["x_ptr", "w_ptr", "bias_ptr", "y_ptr", "partial_ptr", "arrivals_ptr", "res_ptr", "norm_w_ptr",
             "res_out_ptr", "eps", "M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "stride_rm", "stride_om", "k_per_split"]
    sig = {k: sig[k] for k in order}
    for norm in (False, True):
        const = dict(HAS_BIAS=False, SPLIT=True, IEEE=False, SWIGLU=False, NORM=norm, HAS_RESIDUAL=norm,
                     BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, PDL=on, PREFETCH=on, ELEM_BYTES=2)
        out[f"skinny norm={norm}"] = compile_(sg._skinny_gemm_kernel, sig, const, 4, 4)
    sig = pa.decode_signature()
    const = dict(GROUP=2, GROUP_PAD=16, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_N=64,
                 TILE_IN_PAGE=False, USE_WORK=True, USE_QSL=True, PRECISION="tf32", UPCAST=False,
                 PDL=on, PREFETCH=on, PART_ELEMS=2048 if on else 0, PART_BYTES=4096 if on else 0, PAGES=8,
                 FOLD=True, MERGE_G=2, MERGE_S=16, QKV=True, QK_NORM=True)
    out["decode"] = compile_(pa._decode_kernel, sig, const, 4, 3)
    sig = {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "query_start_loc_ptr": "*i32", "index_ptr": "*i32"}
    sig.update(i32(["stride_pp", "stride_ph", "stride_lp", "stride_ot", "stride_oh", "num_splits"]))
    out["merge"] = compile_(pa._merge_splits_kernel, sig, dict(SPLITS_PAD=64, USE_WORK=True, USE_QSL=True,
                                                              HEAD_DIM=128, HEAD_DIM_PAD=128, PDL=on))
    sig = ptr(["x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr"]); sig.update(n_cols="i32", eps="fp32")
    sig.update(i32(["stride_x", "stride_r", "stride_o", "stride_ro"]))
    out["add_rmsnorm"] = compile_(fused._add_rmsnorm_kernel, sig, dict(HAS_RESIDUAL=True, BLOCK=1024, PDL=on))
    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16"}; sig.update(i32(["n_cols", "stride_x", "stride_o"]))
    out["silu_and_mul"] = compile_(fused._silu_and_mul_kernel, sig, dict(BLOCK=1024, PDL=on))
    sig = {"qkv_ptr": "*bf16", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "qw_ptr": "*bf16",
           "kw_ptr": "*bf16", "slot_ptr": "*i64", "q_out_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
           "eps": "fp32"}
    sig.update(i32(["stride_t", "stride_cos", "stride_qt", "stride_qh", "stride_cb", "stride_cs", "stride_ch"]))
    out["qk_norm_rope_store"] = compile_(fused._qk_norm_rope_store_kernel, sig, dict(
        NUM_HEADS=16, NUM_KV_HEADS=8, H_PAD=16, HKV_PAD=8, HEAD_DIM=128, HALF_PAD=64, BLOCK_SIZE=16, QK_NORM=True, PDL=on))
    sig = {"logits_ptr": "*bf16", "stride_row": "i32", "temps_ptr": "*fp32", "seeds_ptr": "*i64", "offsets_ptr": "*i64",
           "part_score_ptr": "*fp32", "part_index_ptr": "*i64", "V": "i32", "Q": "i32", "num_chunks": "i32"}
    out["sample"] = compile_(sample._sample_chunks_kernel, sig, dict(BLOCK=256, N_ROUNDS=7, FAST_LOG=True, PDL=on))
    return out


out = {}
for on in (True, False):
    for name, ptx in kernels(on).items():
        lines = ptx.splitlines()
        first = lambda pat: next((i for i, l in enumerate(lines) if pat in l), -1)
        wait = first("griddepcontrol.wait")
        loads = [l.split()[0] for l in (lines[:wait] if wait >= 0 else [])
                 if "ld.global" in l or "cp.async." in l and "prefetch" not in l]
        out[f"{name} pdl={on}"] = dict(wait=wait, launch=first("griddepcontrol.launch_dependents"),
                                       prefetch=sum("cp.async.bulk.prefetch.L2" in l for l in lines),
                                       first_store=first("st.global"), loads_before_wait=len(loads))
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__import__("triton").__file__),
                                                    "backends", "nvidia", "bin", "ptxas")),
                    reason="triton's ptxas is not installed")
def test_step_kernels_compile_with_pdl_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    res = json.loads(subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip().splitlines()[-1])
    assert len(res) == 16
    for name, r in res.items():
        name, on = name.rsplit(" pdl=", 1)
        if on == "False":
            assert r["wait"] == r["launch"] == -1 and r["prefetch"] == 0, name
            continue
        # wait, then let the next kernel start, before anything is stored
        assert 0 <= r["wait"] < r["launch"] < r["first_store"], (name, r)
        if name.startswith("skinny"):    # weights prefetched; x is read only after the wait
            assert r["prefetch"] >= 1 and r["loads_before_wait"] == 0, (name, r)
        elif name == "decode":           # step inputs (work item, query_start_loc, block table)
            assert r["prefetch"] >= 2 and 0 < r["loads_before_wait"] <= 8, (name, r)
        elif name == "merge":            # its entry of the plan (idle programs leave unblocked)
            assert r["prefetch"] == 0 and 0 < r["loads_before_wait"] <= 2, (name, r)
        else:
            assert r["prefetch"] == 0 and r["loads_before_wait"] == 0, (name, r)


def test_pdl_is_off_where_unsupported():
    """The engine enables PDL only on sm_90+ CUDA devices with compiled kernels: never on the
    CPU or the interpreter, so CPU runs launch exactly as before."""
    from engine.kernels import pdl
    assert not pdl.supported(torch.device("cpu"))
    pdl.enable(False)
    assert pdl.launch_kwargs() == {} and not pdl.enabled()
