"""The prefill attention kernel's launch geometries and program orders, against the float64
reference of tests/test_kernels.py, under the Triton interpreter: every launch the benchmark
may pick for the engine (PrefillLaunch) computes the same attention, on the paths the engine
takes (a grid over query tiles, a tile list in any order, prefixes in the cache, decode rows
in the batch), at head dims the tuned kernels do not pad (64, 128) and ones they do (80, 96).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.kernels import paged_prefill_attention  # noqa: E402
from engine.kernels.launch import PREFILL_LAUNCH, PrefillLaunch, prefill_tile_tokens  # noqa: E402
from tests.test_kernels import (TOLERANCE, DEVICE, make_batch, poisoned, reference_attention,  # noqa: E402
                                rel_error)

REPO = Path(__file__).resolve().parents[1]
# the engine's launch and the other geometries of bench_attention.py's candidates
LAUNCHES = [PREFILL_LAUNCH, PrefillLaunch(128, 128, 8, 2), PrefillLaunch(128, 32, 8, 3), PrefillLaunch(64, 32, 4, 2)]
# decodes, a fresh prompt, a chunk behind a cached prefix that ends mid-page, a prefix hit
MIXED = [(1, 57), (70, 70), (37, 150), (1, 1), (48, 112)]


def tile_list(q_lens, block_q, order):
    """Every (sequence, query tile) of the sequences with q_len > 1, in `order`
    ("heavy_first" as engine.step_inputs builds it, "ascending" as it did before), plus
    padding tiles (b = -1)."""
    tiles = [(b, t) for b, q in enumerate(q_lens) if q > 1 for t in range(-(-q // block_q))]
    if order == "heavy_first":
        tiles.reverse()
    return torch.tensor(tiles + [(-1, 0)] * 3, dtype=torch.int32, device=DEVICE)


def run(seqs, group, head_dim, block_size, dtype, launch, order=None, seed=0):
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(
        seqs, 2 * group, 2, head_dim, block_size, dtype, seed=seed)
    scale = head_dim ** -0.5
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, scale)
    tiles = None
    if order is not None:
        block_q = prefill_tile_tokens(q.shape[1], 2, dtype, launch=launch)
        tiles = tile_list([s[0] for s in seqs], block_q, order)
    out = poisoned(q)
    if tiles is not None:   # the decode rows are the decode kernel's: leave them out of the check
        rows = torch.cat([torch.arange(int(qsl[b]), int(qsl[b + 1])) for b, s in enumerate(seqs) if s[0] > 1])
    else:
        rows = torch.arange(q.shape[0])
    paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, max(s[0] for s in seqs), scale,
                            out=out, tiles=tiles, launch=launch)
    return rel_error(out[rows.to(out.device)], ref[rows])


def launch_id(launch):
    return f"M{launch.block_m}N{launch.block_n}w{launch.num_warps}s{launch.num_stages}"


@pytest.mark.parametrize("launch", LAUNCHES, ids=launch_id)
@pytest.mark.parametrize("order", [None, "heavy_first", "ascending"])
def test_every_launch_and_program_order_matches_reference(launch, order):
    """bf16, GQA group 2, pages of 16: the engine's Qwen3 case, on a mixed batch."""
    assert run(MIXED, 2, 64, 16, torch.bfloat16, launch, order) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("group,head_dim,block_size,dtype", [
    (1, 128, 256, torch.bfloat16),   # a tile inside one page (one block-table load per tile)
    (4, 80, 1, torch.float32),       # padded head_dim, a page per token
    (8, 96, 24, torch.bfloat16),     # padded head_dim, pages that straddle tiles
    (2, 128, 64, torch.float32),     # fp32 halves the tiles: 32-key tiles inside 64-token pages
])
@pytest.mark.parametrize("launch", [LAUNCHES[0], LAUNCHES[2]], ids=launch_id)
def test_head_dims_groups_and_pages(group, head_dim, block_size, dtype, launch):
    seqs = [(1, 30), (45, 45), (20, 99)]
    assert run(seqs, group, head_dim, block_size, dtype, launch, "heavy_first", seed=group) < TOLERANCE[dtype]
    assert run(seqs, group, head_dim, block_size, dtype, launch, None, seed=group) < TOLERANCE[dtype]


@pytest.mark.parametrize("num_sms", [1, 3])
def test_programs_walking_the_tile_list_cover_every_tile(monkeypatch, num_sms):
    """A GPU of 1 or 3 SMs: fewer programs than tiles, so each program walks several entries
    of the list (the snake order) and stops at the padding; every tile is still computed."""
    import importlib
    pa = importlib.import_module("engine.kernels.paged_attention")
    monkeypatch.setattr(pa, "_num_sms", lambda device: num_sms)
    seqs = MIXED + [(90, 90)]
    assert run(seqs, 2, 64, 16, torch.bfloat16, LAUNCHES[0], "heavy_first") < TOLERANCE[torch.bfloat16]
    assert run(seqs, 4, 64, 32, torch.float32, LAUNCHES[2], "heavy_first") < TOLERANCE[torch.float32]


def test_launch_and_scale_are_validated():
    for bad in (dict(block_m=96), dict(block_n=8), dict(num_warps=3), dict(num_stages=0), dict(programs_per_sm=0)):
        with pytest.raises(ValueError, match="PrefillLaunch"):
            PrefillLaunch(**bad)
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch([(5, 9)], 4, 2, 64, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, 5, -0.125)


def test_bench_prefill_stage_runs_on_the_interpreter():
    """`bench_attention.py --smoke --stages prefill`: the old kernel and the engine's launch per
    case, both matching SDPA, and one JSON line naming the engine's launch."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_attention.py"), "--smoke",
                             "--stages", "prefill"], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = report["prefill"]
    cases = {r["case"] for r in rows}
    assert len(cases) == 3 and any("tiles" in c for c in cases)
    for case in cases:
        kernels = {r["kernel"] for r in rows if r["case"] == case}
        assert any(k.startswith("old kernel") for k in kernels) and any(k.endswith("(engine)") for k in kernels)
    assert all(r["rel_err"] < 1e-4 and r["us"] > 0 for r in rows)
    assert report["prefill_engine_launch"] in {r["kernel"].removesuffix(" (engine)") for r in rows}


COMPILE = """
import importlib, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels.launch import PREFILL_LAUNCH as L
pa = importlib.import_module("engine.kernels.paged_attention")   # the package exports a function of that name

fn = pa._prefill_kernel
names = fn.arg_names
const = dict(GROUP=2, GROUP_PAD=2, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_Q=L.block_m // 2,
             BLOCK_M=L.block_m, BLOCK_N=L.block_n, TILE_IN_PAGE=False, PRECISION="tf32", UPCAST=False)
# what a launch specializes: 16-divisible cache/q/out pointers and strides (not the block-table stride)
aligned = ["q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr", "stride_qt", "stride_qh", "stride_cb",
           "stride_cs", "stride_ch", "stride_ot", "stride_oh"]
out = {}
for tiles in (False, True):
    sig = {n: ("constexpr" if n in const or n == "USE_TILES" else "*bf16" if n in aligned[:4] else
               "*i32" if n.endswith("_ptr") else "fp32" if n == "qk_scale" else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={**const, "USE_TILES": tiles},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=L.num_warps, num_stages=L.num_stages))
    ir = k.asm["ttgir"]
    out[str(tiles)] = dict(wgmma=ir.count("ttng.warp_group_dot "), mma=ir.count("tt.dot "),
                           async_copies=ir.count("ttg.async_copy_global_to_local"),
                           tile_loads=sum("tt.load" in l and "bf16" in l for l in ir.splitlines()),
                           ptx_wgmma=k.asm["ptx"].count("wgmma.mma_async"))
print(json.dumps(out))
"""


def test_engine_launch_compiles_to_wgmma_with_pipelined_kv_loads_for_sm90():
    """The engine's launch, compiled for sm_90 (bf16, head_dim 128, GQA 2, pages of 16) the way
    a GPU launch specializes it: both dots of both loops on wgmma, and the K/V tiles loaded by
    cp.async (the software pipeline) rather than synchronously: q is the only tile loaded
    with a plain load. (A local `EVEN_D = ...` without `tl.constexpr` once turned the
    loads back into plain ones: 255 registers and spills.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    res = json.loads(subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=REPO, capture_output=True,
                                    text=True, check=True).stdout.strip().splitlines()[-1])
    for tiles, r in res.items():
        assert r["wgmma"] == 4 and r["mma"] == 0 and r["ptx_wgmma"] > 0, (tiles, r)
        assert r["tile_loads"] == 1 and r["async_copies"] >= 4, (tiles, r)


def test_bench_overlap_stage_smoke():
    """`bench_attention.py --smoke --stages overlap`: a mixed step's decode and prefill kernels,
    alone and one after the other, right against the torch references (the timings and the
    two-stream variant need a GPU)."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--smoke",
                             "--stages", "overlap", "--no-flashinfer"], capture_output=True, text=True,
                            check=True, cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert "streams_us" in result.stdout
    rows = json.loads(result.stdout.strip().splitlines()[-1])["overlap"]
    assert [(r["B"], r["prompt"]) for r in rows] == [(2, 24), (3, 40)]
    for r in rows:
        assert r["rel_err"] < 1e-5 and r["max_diff"] == 0, r

