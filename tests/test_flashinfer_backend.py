"""The flashinfer backend without a GPU or flashinfer: the page-table builder against a
plain Python reference, backend resolution, the planner's choice of wrapper (with a fake
flashinfer module that records plan() calls) and the runner's once-per-step plan hook."""
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from engine.layers import attention
from engine.layers.attention import Attention, AttentionMetadata, resolve_backend
from engine.layers.flashinfer_backend import FlashInferPlanner, paged_kv_layout


def reference_layout(context_lens, block_tables, block_size):
    indptr, indices, last = [0], [], []
    for ctx, row in zip(context_lens, block_tables):
        pages = -(-int(ctx) // block_size)
        indices += [int(b) for b in row[:pages]]
        indptr.append(indptr[-1] + pages)
        last.append(int(ctx) - (pages - 1) * block_size)
    return indptr, indices, last


def layout(context_lens, block_tables, block_size):
    B, W = block_tables.shape
    bufs = (np.full(B + 3, -7, np.int32), np.full(B * W + 3, -7, np.int32),
            np.full(B + 3, -7, np.int32))
    return [a.tolist() for a in paged_kv_layout(np.asarray(context_lens, np.int32),
                                                block_tables, block_size, *bufs)]


def test_paged_kv_layout_by_hand():
    tables = np.array([[5, 9, 0], [7, 3, 8], [2, 0, 0], [0, 0, 0]], np.int32)
    # 16 fills one block exactly; 33 spills one token into a third; 1 token; padding row
    assert layout([16, 33, 1, 1], tables, 16) == [[0, 1, 4, 5, 6], [5, 7, 3, 8, 2, 0],
                                                  [16, 1, 1, 1]]
    # block_size 1: one page per token, every last page holds one token
    assert layout([3, 1], tables[:2], 1) == [[0, 3, 4], [5, 9, 0, 7], [1, 1]]


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_paged_kv_layout_matches_reference(block_size):
    rng = np.random.default_rng(block_size)
    for _ in range(50):
        B, W = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        tables = rng.integers(0, 1000, (B, W)).astype(np.int32)
        ctx = rng.integers(1, W * block_size + 1, B)
        exact = rng.random(B) < 0.3       # contexts that fill their last block exactly
        ctx[exact] = -(-ctx[exact] // block_size) * block_size
        assert layout(ctx, tables, block_size) == list(reference_layout(ctx, tables, block_size))


def test_resolve_backend_flashinfer(monkeypatch):
    with pytest.raises(ValueError, match="'flashinfer' needs a CUDA device"):
        resolve_backend("flashinfer", "cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flashinfer" else real(name, *a))
    with pytest.raises(ValueError, match="needs the flashinfer package"):
        resolve_backend("flashinfer", "cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert resolve_backend("flashinfer", "cuda") == "flashinfer"
    assert resolve_backend("auto", "cuda") == "triton"


# ---- the planner, over a fake flashinfer ------------------------------------------------

class FakeWrapper:
    def __init__(self, workspace, layout, use_cuda_graph=False, use_tensor_cores=False, **buffers):
        assert layout == "NHD"
        self.use_cuda_graph, self.use_tensor_cores, self.buffers = use_cuda_graph, use_tensor_cores, buffers
        self.plans = []

    def plan(self, *args, **kwargs):
        self.plans.append(([a.tolist() if torch.is_tensor(a) else a for a in args], kwargs))

    def run(self, q, kv):
        self.ran = kv
        return q * 2


@pytest.fixture
def fake_flashinfer(monkeypatch):
    module = types.SimpleNamespace(BatchPrefillWithPagedKVCacheWrapper=FakeWrapper,
                                   BatchDecodeWithPagedKVCacheWrapper=FakeWrapper)
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    return module


def make_planner(heads=4, kv_heads=2, dtype=torch.bfloat16, block_size=16):
    layers = [Attention(heads, kv_heads, 32, 0.125, "flashinfer") for _ in range(2)]
    return FlashInferPlanner(layers, block_size, dtype, max_seqs=8, max_blocks=4,
                             device=torch.device("cpu"))


def test_planner_picks_wrapper(fake_flashinfer):
    p = make_planner()
    assert not p.use_tensor_cores and make_planner(heads=8).use_tensor_cores
    tables = np.array([[3, 4, 0, 0], [6, 0, 0, 0], [1, 2, 5, 0]], np.int32)
    heads = [4, 2, 32, 16]

    # mixed step (one decode first, then two prefills): the prefill wrapper, causal
    qsl = np.array([0, 1, 5, 40], np.int32)
    w = p.plan(qsl, np.array([17, 4, 35], np.int32), tables, 1, 0)
    assert w is p.prefill
    args, kw = w.plans[-1]
    assert args == [[0, 1, 5, 40], [0, 2, 3, 6], [3, 4, 6, 1, 2, 5], [1, 4, 3]] + heads
    assert kw == dict(causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
                      sm_scale=0.125)

    # decode-only eager step: the decode wrapper, no qo_indptr
    w = p.plan(np.array([0, 1, 2], np.int32), np.array([18, 16], np.int32), tables[:2], 2, 0)
    assert w is p.decode and not w.use_cuda_graph
    assert w.plans[-1][0] == [[0, 2, 3], [3, 4, 6], [2, 16]] + heads

    # graph step of size 4 (rows 2, 3 are padding: context 1 on block 0): its own wrapper,
    # with fixed buffers for 4 rows of max_blocks pages, re-planned (not re-made) each step
    pad = np.array([[3, 4, 0, 0], [6, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.int32)
    w = p.plan(np.arange(5, dtype=np.int32), np.array([19, 17, 1, 1], np.int32), pad, 2, 4)
    assert w.use_cuda_graph and p.graph_decode == {4: w}
    assert [b.numel() for b in w.buffers.values()] == [5, 16, 4]
    assert w.plans[-1][0] == [[0, 2, 4, 5, 6], [3, 4, 6, 0, 0, 0], [3, 1, 1, 1]] + heads
    assert p.plan(np.arange(5, dtype=np.int32), np.array([20, 18, 1, 1], np.int32), pad, 2, 4) is w
    assert len(w.plans) == 2 and w.plans[-1][0][2] == [4, 2, 1, 1]


def test_planner_rejects_float32(fake_flashinfer):
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        make_planner(dtype=torch.float32)


def test_attend_runs_the_planned_wrapper():
    wrapper = FakeWrapper(None, "NHD")
    q, k_cache, v_cache = torch.ones(3, 4, 8), torch.zeros(2, 16, 2, 8), torch.zeros(2, 16, 2, 8)
    meta = AttentionMetadata(torch.zeros(3), torch.zeros(1, 1), torch.zeros(1), torch.zeros(2),
                             3, 3, wrapper=wrapper)
    assert torch.equal(attention.ATTEND["flashinfer"](q, k_cache, v_cache, meta, 0.1), q * 2)
    assert wrapper.ran[0] is k_cache and wrapper.ran[1] is v_cache
    meta.wrapper = None
    with pytest.raises(ValueError, match="planned wrapper"):
        attention.ATTEND["flashinfer"](q, k_cache, v_cache, meta, 0.1)


# ---- the runner plans once per step, from the host copy, before the forward ---------------

def test_runner_plans_every_step(tmp_path, monkeypatch):
    from engine import LLM, SamplingParams
    from engine.checkpoint import tiny_config, write_random_checkpoint
    path = write_random_checkpoint(tiny_config("qwen3"), tmp_path / "q", dtype="float32", seed=0)
    llm = LLM(str(path), device="cpu", dtype="float32", attention_backend="torch",
              num_gpu_blocks=64, max_model_len=64, block_size=4, max_num_batched_tokens=16,
              max_num_seqs=4)
    calls, sentinel = [], object()

    class Planner:
        def plan(self, qsl, ctx, tables, num_decode_tokens, graph_bs):
            calls.append((qsl.tolist(), ctx.tolist(), tables.copy(), num_decode_tokens, graph_bs))
            return sentinel

    seen = []
    torch_attend = attention.ATTEND["torch"]

    def attend(q, k_cache, v_cache, meta, scale):   # the layers get the planned wrapper
        seen.append(meta.wrapper)
        return torch_attend(q, k_cache, v_cache, meta, scale)

    monkeypatch.setitem(attention.ATTEND, "torch", attend)
    llm.model_runner.planner = Planner()
    prompts = [[5, 6, 7], list(range(10, 30))]    # 3 + 20 tokens: the second is chunked
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                 use_tqdm=False)
    steps = llm.step_records
    assert len(calls) == len(steps) and seen and all(w is sentinel for w in seen)
    # step 1: both prefills, the long one cut at the 16-token budget
    assert calls[0][0] == [0, 3, 16] and calls[0][1] == [3, 13] and calls[0][3] == 0
    for qsl, ctx, tables, num_decode, graph_bs in calls:
        assert graph_bs == 0 and len(ctx) == len(qsl) - 1 == tables.shape[0]
        assert tables.shape[1] >= max(-(-c // 4) for c in ctx)
    assert calls[-1][0] == [0, 1] and calls[-1][1] == [22] and calls[-1][3] == 1
    llm.close()
