"""Split-KV decode with the merge folded into the decode kernel (engine.kernels.paged_attention
`_merge_if_last`): the same outputs as the two-kernel path and as a float64 reference, for
several splits, uneven shares, block sizes, GQA groups and batches whose sequences split
differently; the ticket counters are back to zero after every launch, so back-to-back calls
(graph replays) need no memset. Under the Triton interpreter the programs run one after the
other, so the last split in grid order merges; the sm_90 compile below checks the ordering
the GPU needs (barrier, acq_rel ticket, L1-bypassing merge loads)."""
import dataclasses
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.kernels import paged_decode_attention
from engine.kernels.fused import qk_norm_rope_store
from engine.kernels.launch import decode_work_capacity, plan_decode_work
from policy.decode_plan import DecodePlan
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.rotary import RotaryEmbedding
from tests.test_kernels import (DEVICE, TOLERANCE, make_batch, on_device, poisoned, reference_attention,
                                rel_error)

pa = importlib.import_module("engine.kernels.paged_attention")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def work_list(context_lens, num_kv_heads, sms, rows):
    cap = decode_work_capacity(len(context_lens), DecodePlan(num_kv_heads, sms)) + 3   # padded, as a graph's
    items, index = np.zeros((cap, 4), np.int32), np.zeros((rows, 2), np.int32)
    plan_decode_work(np.asarray(context_lens), DecodePlan(num_kv_heads, sms), items, index)
    return items, index


def tickets(q):
    return pa._TICKETS[q.device]


def tickets_are_zero(q):
    return int(tickets(q).abs().sum()) == 0


@pytest.mark.parametrize("group,block_size,dtype,sms", [
    (1, 16, torch.float32, 2), (2, 1, torch.float32, 4), (4, 24, torch.bfloat16, 3),
    (8, 64, torch.float32, 12), (2, 16, torch.float16, 6)])
def test_folded_work_list_equals_two_kernels_and_reference(group, block_size, dtype, sms):
    """The runner's launch (work list, query_start_loc, a prefill row after the decodes) on a
    small "GPU", so long contexts split into several uneven shares and short ones stay whole:
    a batch of mixed split counts. Group 8 on 12 SMs splits one sequence into more shares
    than the merge loads at once (MERGE_S = 8 there): its loop runs twice."""
    num_kv_heads, head_dim = 2, 64
    seqs = [(1, 2000), (1, 1), (1, 37), (1, 130), (1, 451), (4, 30)]
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(
        seqs, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, seed=group * block_size + sms)
    num_decode = 5
    items, index = work_list(context_lens[:num_decode].cpu().numpy(), num_kv_heads, sms, len(seqs))
    shares = index[:num_decode, 1]
    assert shares.max() >= 3 and (shares == 1).any()        # some split (several ways), some whole
    sizes = np.diff(np.concatenate([[0], items[items[:, 0] == 0, 2]]))
    assert len(set(sizes)) > 1                              # uneven shares
    if group == 8:
        assert shares.max() > 4096 // (8 * head_dim)        # more splits than one merge load
    work = on_device(torch.from_numpy(items), torch.from_numpy(index))
    scale = head_dim ** -0.5
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, scale)
    rows = qsl[:num_decode].long()
    outs = {}
    for fold in (True, False):
        outs[fold] = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                            out=poisoned(q), query_start_loc=qsl, work=work, fold=fold)
        assert rel_error(outs[fold][rows], ref[rows.cpu()]) < TOLERANCE[dtype]
        assert torch.isnan(outs[fold][int(qsl[num_decode]):]).all()   # the prefill row: untouched
    assert tickets_are_zero(q)
    # the two paths differ only in the order of fp32 sums (then one rounding to the dtype)
    diff = (outs[True][rows].double() - outs[False][rows].double()).abs().max().item()
    assert diff <= (1e-6 if dtype == torch.float32 else 1e-2), diff


@pytest.mark.parametrize("num_splits,head_dim", [(2, 64), (3, 80), (7, 64)])
def test_folded_equal_splits_and_padding_rows(num_splits, head_dim):
    """Without a work list (num_splits equal shares of every sequence): splits past a short
    context are empty, and graph padding rows (context 0) merge to zeros."""
    seqs = [(1, 300), (1, 5), (1, 64), (1, 0), (1, 0)]
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(
        [(1, max(c, 1)) for _, c in seqs], 8, 2, head_dim, 16, torch.float32, seed=num_splits)
    context_lens = on_device(torch.tensor([c for _, c in seqs], dtype=torch.int32))[0]
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, 0.1)
    folded = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.1, num_splits,
                                    out=poisoned(q), fold=True)
    two = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.1, num_splits,
                                 out=poisoned(q), fold=False)
    assert torch.equal(folded[3:], torch.zeros_like(folded[3:]))
    assert rel_error(folded[:3], ref[:3]) < TOLERANCE[torch.float32]
    assert (folded - two).abs().max().item() <= 1e-6
    assert tickets_are_zero(q)


def test_back_to_back_calls_reuse_the_reset_counters():
    """Two launches over the same counters (as a CUDA graph replays): the second, on new
    queries and contexts, is right only if the first put every ticket back to zero. A
    counter left non-zero makes its sequence's splits miss the merge: shown by leaving one
    on purpose."""
    num_kv_heads, group, head_dim, sms = 2, 2, 64, 2
    seqs = [(1, 400), (1, 260), (1, 90)]
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(
        seqs, group * num_kv_heads, num_kv_heads, head_dim, 16, torch.float32, seed=11)
    items, index = work_list(context_lens.cpu().numpy(), num_kv_heads, sms, len(seqs))
    assert (index[:2, 1] > 1).all()
    work = on_device(torch.from_numpy(items), torch.from_numpy(index))
    out = poisoned(q)
    for call in range(2):
        q = q.normal_(generator=torch.Generator(DEVICE).manual_seed(call))
        ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, 0.125)
        out.fill_(float("nan"))
        paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.125, out=out,
                               query_start_loc=qsl, work=work, fold=True)
        assert rel_error(out, ref) < TOLERANCE[torch.float32]
        assert tickets_are_zero(q)
    tickets(q)[0] = 5      # sequence 0, KV head 0: a stale count, past its 2 splits
    out.fill_(float("nan"))
    paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.125, out=out,
                           query_start_loc=qsl, work=work, fold=True)
    assert torch.isnan(out[0, :group]).all() and torch.isfinite(out[1:]).all()
    tickets(q).zero_()


def test_fold_switch_is_read_and_checked_at_import():
    """TWINSERVE_DECODE_FOLD: a comma list of merge and qkv (default both), or none; anything
    else stops the import with a one-line error."""
    code = ("import importlib; pa = importlib.import_module('engine.kernels.paged_attention'); "
            "print(pa.FOLD_SPLITS, pa.FOLD_QKV)")
    env = {**os.environ, "PYTHONPATH": ROOT}
    seen = {}
    for value in (None, "merge", "qkv", "none", "merge, qkv"):
        run_env = {k: v for k, v in env.items() if k != "TWINSERVE_DECODE_FOLD"}
        if value is not None:
            run_env["TWINSERVE_DECODE_FOLD"] = value
        out = subprocess.run([sys.executable, "-c", code], env=run_env, cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
        seen[value] = tuple(word == "True" for word in out)
    assert seen == {None: (True, True), "merge": (True, False), "qkv": (False, True), "none": (False, False),
                    "merge, qkv": (True, True)}
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "TWINSERVE_DECODE_FOLD": "2"}, cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "TWINSERVE_DECODE_FOLD must be a comma list of merge and qkv" in bad.stderr


def test_fold_default_follows_the_switch(monkeypatch):
    """fold=None takes FOLD_SPLITS (TWINSERVE_DECODE_FOLD): both settings give the result."""
    seqs = [(1, 500), (1, 3)]
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(seqs, 4, 2, 64, 16, torch.float32, seed=5)
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, 0.125)
    for on in (True, False):
        monkeypatch.setattr(pa, "FOLD_SPLITS", on)
        out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.125, 4, out=poisoned(q))
        assert rel_error(out, ref) < TOLERANCE[torch.float32]


COMPILE = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
pa = importlib.import_module("engine.kernels.paged_attention")
sig = pa.decode_signature()
const = dict(GROUP=2, GROUP_PAD=16, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_N=64,
             TILE_IN_PAGE=False, USE_WORK=True, USE_QSL=True, PRECISION="tf32", UPCAST=False,
             PDL=True, PREFETCH=True, PART_ELEMS=2048, PART_BYTES=4096, PAGES=8, FOLD=True, MERGE_G=2, MERGE_S=16,
             QKV=True, QK_NORM=True)
sig.update({k: "constexpr" for k in const})
ptx = triton.compile(ASTSource(fn=pa._decode_kernel, signature=sig, constexprs=const),
                     target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
lines = ptx.splitlines()
idx = lambda pat: [i for i, l in enumerate(lines) if pat in l]
print(json.dumps(dict(atom_add=idx("atom.") and [i for i in idx("atom.") if ".add" in lines[i]],
                      atom_text=[lines[i].strip() for i in idx("atom.")], bar=idx("bar.sync"),
                      wait=idx("griddepcontrol.wait"), lse_store=idx("st.global"), cg_loads=idx("ld.global.cg"))))
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__import__("triton").__file__),
                                                    "backends", "nvidia", "bin", "ptxas")),
                    reason="triton's ptxas is not installed")
def test_folded_kernel_orders_its_ticket_for_sm90():
    """Compiled for sm_90 (no GPU needed): the ticket is one acq_rel atomic add at GPU scope,
    after the PDL wait and after a CTA barrier that follows the partial stores (so every
    thread's partial is released with it); the counter is reset by a second atomic; the
    merge's loads bypass L1."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    r = json.loads(subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip().splitlines()[-1])
    assert len(r["atom_text"]) == 2, r["atom_text"]                 # the ticket and the reset
    add = r["atom_add"][0]
    assert "acq_rel" in r["atom_text"][0] and "gpu" in r["atom_text"][0], r["atom_text"]
    assert r["wait"] and r["wait"][0] < add
    assert any(s < add for s in r["lse_store"])                    # partials stored before the ticket
    last_store_before = max(s for s in r["lse_store"] if s < add)
    assert any(last_store_before < b < add for b in r["bar"])      # ... and a barrier between
    assert r["cg_loads"] and min(r["cg_loads"]) > add              # merge loads after it, from L2


def test_bench_fold_stage_smoke():
    """`bench_attention.py --smoke --stages fold`: the three variants per batch on the runner's
    launch, some sequences split (so the merge is what is compared), all right and equal."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention.py"), "--smoke",
                             "--stages", "fold", "--no-flashinfer"], capture_output=True, text=True, check=True,
                            cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert "best/two" in result.stdout
    rows = json.loads(result.stdout.strip().splitlines()[-1])["fold"]["rows"]
    assert [r["B"] for r in rows] == [1, 3] and all(r["split"] >= 1 for r in rows)
    for r in rows:
        assert r["rel_err"] < 1e-5, r
        for v in ("two", "fold", "qkv", "fold_qkv"):
            assert r[f"{v}_max_diff"] <= 1e-5 and r[f"{v}_eager_us"] > 0, r


# ---- q/k RMSNorm + RoPE + the K/V store folded in too (decode-only steps) -------------------

def qkv_step(group, block_size, dtype, norm, sms, seed):
    """A decode-only step as the runner hands it to the layer: the qkv projection's output,
    each row's position (context - 1) and slot, RoPE tables, q/k norm weights, the work
    list; the last row is a graph padding row (context 1, slot -1)."""
    num_kv_heads, head_dim = 2, 64
    num_heads = group * num_kv_heads
    seqs = [(1, 300), (1, 1), (1, 37), (1, 130), (1, 451), (1, 1)]
    _, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(
        seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(len(seqs), (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    positions = (context_lens.cpu() - 1).long()
    rows = torch.arange(len(seqs))
    slots = block_tables.cpu()[rows, positions // block_size].long() * block_size + positions % block_size
    slots[-1] = -1
    rope = RotaryEmbedding(head_dim, 1024, 10000.0)
    norms = (tuple((1 + 0.2 * torch.randn(head_dim, generator=gen)).to(dtype) for _ in range(2))
             if norm else (None, None))
    items, index = work_list(context_lens.cpu().numpy(), num_kv_heads, sms, len(seqs))
    qkv, positions, slots, cos, sin, items, index = on_device(qkv, positions, slots, rope.cos, rope.sin,
                                                               torch.from_numpy(items), torch.from_numpy(index))
    norms = tuple(None if w is None else w.to(DEVICE) for w in norms)
    return dict(qkv=qkv, positions=positions, cos=cos, sin=sin, q_norm=norms[0], k_norm=norms[1], eps=1e-6,
                num_heads=num_heads, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                context_lens=context_lens, slot_mapping=slots, scale=head_dim ** -0.5,
                query_start_loc=qsl, work=(items, index))


@pytest.mark.parametrize("group,block_size,dtype,norm,sms", [
    (2, 16, torch.float32, True, 4), (1, 24, torch.bfloat16, True, 3), (4, 1, torch.float32, False, 2),
    (8, 64, torch.bfloat16, True, 12), (2, 16, torch.float16, False, 6)])
def test_qkv_fold_equals_rope_store_then_decode(group, block_size, dtype, norm, sms):
    """paged_decode_attention_qkv against qk_norm_rope_store + the two-kernel decode on copies
    of the same caches: the same attention output and the same cache contents (rotated K and
    V at each row's slot, nothing for the padding row), up to RMSNorm's order of summation."""
    a = qkv_step(group, block_size, dtype, norm, sms, seed=group + block_size + sms)
    assert (a["work"][1][:, 1] > 1).any() and (a["work"][1][:, 1] == 1).any()
    b = {**a, "k_cache": a["k_cache"].clone(), "v_cache": a["v_cache"].clone()}
    q = qk_norm_rope_store(a["qkv"], a["positions"], a["cos"], a["sin"], a["num_heads"], a["k_cache"].shape[2],
                           a["k_cache"].shape[3], a["q_norm"], a["k_norm"], a["eps"], a["k_cache"], a["v_cache"],
                           a["slot_mapping"])
    ref = paged_decode_attention(q, a["k_cache"], a["v_cache"], a["block_tables"], a["context_lens"], a["scale"],
                                 out=poisoned(q), query_start_loc=a["query_start_loc"], work=a["work"], fold=False)
    out = paged_attention_qkv(b)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    rows = torch.arange(5)                                   # the real rows (the last pads)
    exact = reference_attention(q, a["k_cache"], a["v_cache"], a["block_tables"], a["context_lens"],
                                a["query_start_loc"], a["scale"])
    assert rel_error(out[rows], exact[rows]) < TOLERANCE[dtype]
    assert rel_error(out, ref.cpu().double()) < tol
    assert torch.equal(b["v_cache"], a["v_cache"])           # V: a copy
    assert rel_error(b["k_cache"], a["k_cache"].cpu().double()) < tol * 1e-1
    written = b["k_cache"].flatten(0, 1)[a["slot_mapping"][:5]]
    assert not torch.equal(written, torch.zeros_like(written))
    assert tickets_are_zero(q)


def paged_attention_qkv(step):
    return pa.paged_decode_attention_qkv(
        step["qkv"], step["positions"], step["cos"], step["sin"], step["q_norm"], step["k_norm"], step["eps"],
        step["num_heads"], step["k_cache"], step["v_cache"], step["block_tables"], step["context_lens"],
        step["slot_mapping"], step["scale"], query_start_loc=step["query_start_loc"], work=step["work"])


def test_qkv_fold_rejects_bad_inputs():
    step = qkv_step(2, 16, torch.float32, True, 4, seed=3)
    for change, words in [(dict(qkv=step["qkv"][:, :-2]), "qkv must be"),
                          (dict(positions=step["positions"].int()), "positions and slot_mapping int64"),
                          (dict(cos=step["cos"][:, :-1]), "cos/sin must be"),
                          (dict(k_norm=None), "both be"),
                          (dict(work=None), "work list")]:
        with pytest.raises(ValueError, match=words):
            paged_attention_qkv({**step, **change})


def test_attention_layer_takes_the_qkv_fold_on_decode_only_steps(monkeypatch):
    """Attention.attend_qkv: one launch for a runner-built decode-only step; None (the caller
    stores and attends in two launches) for a step with prefill tiles, without a plan, or with
    the fold off (TWINSERVE_DECODE_FOLD without qkv)."""
    step = qkv_step(2, 16, torch.float32, True, 4, seed=9)
    layer = Attention(step["num_heads"], 2, 64, step["scale"], "triton")
    layer.k_cache, layer.v_cache = step["k_cache"], step["v_cache"]
    meta = AttentionMetadata(slot_mapping=step["slot_mapping"], block_tables=step["block_tables"],
                             context_lens=step["context_lens"], query_start_loc=step["query_start_loc"],
                             max_query_len=1, max_context_len=451, num_decode_tokens=6, decode_rows=6,
                             decode_work=step["work"])
    args = (step["qkv"], step["positions"], step["cos"], step["sin"], step["q_norm"], step["k_norm"], 1e-6)
    expected = paged_attention_qkv({**step, "k_cache": step["k_cache"].clone(), "v_cache": step["v_cache"].clone()})
    out = layer.attend_qkv(*args, meta)
    assert out is not None and torch.equal(out, expected)
    tiles = torch.full((4, 2), -1, dtype=torch.int32, device=DEVICE)
    assert layer.attend_qkv(*args, dataclasses.replace(meta, prefill_tiles=tiles)) is None
    assert layer.attend_qkv(*args, dataclasses.replace(meta, decode_work=None)) is None
    monkeypatch.setattr(pa, "FOLD_QKV", False)
    assert layer.attend_qkv(*args, meta) is None
