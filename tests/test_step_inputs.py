"""Step packing and CUDA-graph steps, emulated on the CPU: a "graph" here is the model body
bound at capture time to the step buffer's views and re-run on replay, which is exactly
what a CUDA graph does with those addresses. Decode graphs and mixed prefill+decode graphs
(padded by policy.cuda_graphs' rule) must give the tokens the eager reference gives."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere

import random

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.checkpoint import tiny_config, write_random_checkpoint
from engine.kernels.launch import decode_work_capacity
from policy.decode_plan import DecodePlan
from engine.step_inputs import (DECODE_GRAPH, EAGER, MIXED_GRAPH, BlockTableMirror, StepBuffer,
                                StepPacker, dummy_batch, layout)
from policy import Batch, Sequence
from policy.cuda_graphs import capture_sizes, decode_sizes, graph_rows, mixed_sizes, padded_size

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
TRITON = dict(device="cpu", dtype="float32", attention_backend="triton")


def test_capture_sizes_rule():
    sizes = capture_sizes(512)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == 512
    gaps = np.diff(sizes)
    assert gaps.max() <= 64 and all(g <= 16 for s, g in zip(sizes[1:], gaps) if s <= 256)
    assert capture_sizes(1) == [1] and capture_sizes(0) == [] and capture_sizes(100)[-1] == 100
    assert decode_sizes(48, 512)[-1] == 48 and decode_sizes(256, 64)[-1] == 64
    assert min(mixed_sizes(8192, 512)) == 2
    for n in range(1, 600):
        size = padded_size(n, sizes)
        assert (size >= n and sizes[sizes.index(size) - 1] < n if size and size != 1 else True)
        assert (size == 0) == (n > 512)
    dec, mix = decode_sizes(256, 512), mixed_sizes(8192, 512)
    assert graph_rows(33, 33, True, dec, mix) == ("decode", 48)
    assert graph_rows(80, 65, False, dec, mix) == ("mixed", 80)
    assert graph_rows(81, 65, False, dec, mix) == ("mixed", 96)
    assert graph_rows(600, 65, False, dec, mix) == ("eager", 600)
    assert graph_rows(5, 5, True, [], []) == ("eager", 5)


def packer(max_seqs=8, max_tokens=64, block_size=4, max_model_len=64, tile=4):
    max_blocks = -(-max_model_len // block_size)
    kv_heads, sms = 2, 4     # a small "GPU": the split-KV plan splits contexts of a few tokens
    buffer = StepBuffer(max_tokens, max_seqs, max_blocks, max_tokens // tile + max_seqs,
                        decode_work_capacity(max_seqs, DecodePlan(kv_heads, sms)), torch.device("cpu"))
    return StepPacker(buffer, block_size, max_blocks, max_seqs, 1000, tile, DecodePlan(kv_heads, sms))


def batch_of(rng, n):
    """n sequences, each a decode or a prefill chunk at some context, on distinct blocks."""
    seqs, new, start, block = [], [], [], 1
    for i in range(n):
        q = 1 if rng.random() < 0.5 else rng.randrange(2, 11)
        cached = rng.randrange(0, 20)
        s = Sequence(i, [rng.randrange(1, 999) for _ in range(cached + q)], 4)
        s.block_table = list(range(block, block + -(-(cached + q) // 4)))
        block += len(s.block_table)
        seqs.append(s), new.append(q), start.append(cached)
    return Batch(seqs=seqs, num_new_tokens=new, num_computed_tokens=start, sample=[True] * n,
                 num_batched_tokens=sum(new), num_prefill_tokens=sum(q for q in new if q > 1))


@pytest.mark.parametrize("seed", range(6))
def test_mixed_graph_packing(seed):
    """A mixed step packed for a graph: every real token keeps its slot and position, every
    prefill token is covered by exactly one tile, padding stores nothing and belongs to no
    sequence, the graph samples all its rows (padding rows greedy over row 0), and the
    graph's inputs sit where the capture saw them whatever the batch is."""
    rng = random.Random(seed)
    p = packer()
    p.mixed_sizes = mixed_sizes(64, 64)
    batch = batch_of(rng, rng.randrange(2, 7))
    e_packer = packer()
    eager = e_packer.pack(batch, None)
    e_host = [a.copy() for a in e_packer.buffer.views(eager.T, eager.B, eager.W, eager.P, eager.D, eager.S)[1]]
    step = p.pack(batch, None)
    T = sum(batch.num_new_tokens)
    if T < 2 or all(q == 1 for q in batch.num_new_tokens):
        pytest.skip("drew a decode-only batch")
    assert step.graph == MIXED_GRAPH and step.T == padded_size(T, p.mixed_sizes) >= T
    assert step.num_tokens == T and step.decode_rows == step.B == min(step.T, 8)
    assert eager.graph == EAGER and eager.T == T
    host = p.buffer.views(step.T, step.B, step.W, step.P, step.D, step.S)[1]
    ids, pos, slots, ctx, qsl, tables, tiles = host[:7]
    order = step.order or list(range(len(batch)))
    q = np.diff(qsl[:len(batch) + 1])
    assert q.tolist() == [batch.num_new_tokens[i] for i in order]
    assert (qsl[len(batch) + 1:] == T).all() and (ctx[len(batch):] == 0).all()
    assert (slots[T:] == -1).all() and (slots[:T] >= 0).all()
    covered = np.zeros(T, dtype=int)
    for b, t in tiles:
        if b < 0:
            continue
        assert q[b] > 1
        lo = qsl[b] + t * p.tile_tokens
        covered[lo:min(lo + p.tile_tokens, qsl[b + 1])] += 1
    assert all(covered[qsl[b]:qsl[b + 1]].tolist() == [1] * q[b] for b in range(len(batch)) if q[b] > 1)
    assert all(covered[qsl[b]] == 0 for b in range(len(batch)) if q[b] == 1)   # decode kernel's rows
    real = tiles[tiles[:, 0] >= 0]
    assert (tiles[len(real):, 0] < 0).all()                    # padding tiles after the real ones
    keys = [ctx[b] - q[b] + min(q[b], (t + 1) * p.tile_tokens) for b, t in real]
    assert keys == sorted(keys, reverse=True)                  # heaviest (most keys) first
    # the eager packing of the same batch agrees on every real row
    tokens = [t for i in order for t in batch.seqs[i].token_ids[batch.num_computed_tokens[i]:
                                                                 batch.num_computed_tokens[i] + batch.num_new_tokens[i]]]
    assert ids[:T].tolist() == tokens == e_host[0][:T].tolist()
    assert pos[:T].tolist() == e_host[1][:T].tolist() and slots[:T].tolist() == e_host[2][:T].tolist()
    assert step.S == step.B and step.sampled == list(range(len(batch)))
    logits_rows, temperatures = host[9:11]
    assert logits_rows[:len(batch)].tolist() == (qsl[1:len(batch) + 1] - 1).tolist()
    assert (logits_rows[len(batch):] == 0).all() and (temperatures == 0).all()
    spans = layout(step.T, step.B, step.W, step.P, step.D, 1)[0]
    assert [o for o, _ in layout(step.T, step.B, step.W, step.P, step.D, 7)[0][:9]] == [o for o, _ in spans[:9]]


def test_block_table_mirror_reuses_rows():
    """Re-allocated tables (preemption, graph capture) reuse their sequence's row: many
    re-allocations never exhaust a mirror sized for the batch, and the copy is current."""
    mirror = BlockTableMirror(capacity=4, max_blocks=8)
    seqs = [Sequence(i, [1], 1) for i in range(3)]
    out = np.full((3, 8), -1, dtype=np.int32)
    for round_ in range(20):
        for i, s in enumerate(seqs):
            s.block_table = [round_ * 10 + i + j for j in range(1 + round_ % 5)]
        mirror.gather(seqs, [len(s.block_table) for s in seqs], out)
        for i, s in enumerate(seqs):
            assert out[i, :len(s.block_table)].tolist() == s.block_table


class ReplayOnCpu:
    """A CPU stand-in for torch.cuda.CUDAGraph: replays the body captured over fixed views
    (ModelRunner.graph_body, the callable CUDA captures), writing its output in place."""

    def __init__(self, body, out):
        self.body, self.out, self.replays = body, out, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.body())


def capture_on_cpu(runner, kinds=(DECODE_GRAPH, MIXED_GRAPH)):
    """What ModelRunner.capture_graphs does on CUDA, with ReplayOnCpu graphs."""
    cfg = runner.config
    todo = [(DECODE_GRAPH, s) for s in decode_sizes(cfg.max_num_seqs, cfg.cuda_graph_max_tokens)]
    todo += [(MIXED_GRAPH, s) for s in mixed_sizes(cfg.max_num_batched_tokens, cfg.cuda_graph_max_tokens)]
    for kind, size in todo:
        if kind not in kinds:
            continue
        step, body = runner.graph_body(kind, size)
        out = body().clone()                   # the "capture": the body's output, kept
        runner.graphs[(kind, size)] = (ReplayOnCpu(body, out), out)
    runner.packer.decode_sizes = sorted(s for k, s in runner.graphs if k == DECODE_GRAPH)
    runner.packer.mixed_sizes = sorted(s for k, s in runner.graphs if k == MIXED_GRAPH)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return str(write_random_checkpoint(tiny_config("qwen3"), tmp_path_factory.mktemp("ckpt") / "q",
                                       dtype="float32", seed=0, std=0.3))


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("policy", ["chunked", "prefill_first"])
def test_graph_steps_equal_eager(qwen3, policy):
    """Decode and mixed steps replayed from (emulated) graphs, with chunked prefill, prefix
    hits and preemption, give the eager path's tokens; the fused kernels (q/k-norm + RoPE +
    KV store, add + RMSNorm, SiLU-and-mul) run in both."""
    ps = prompts([3, 9, 17, 30]) + [prompts([20], 1)[0] + p for p in prompts([2, 7], 2)]
    kw = dict(TRITON, num_gpu_blocks=18, block_size=4, max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=16, cuda_graph_max_tokens=16, scheduler_policy=policy)
    eager = LLM(qwen3, **kw)
    ref = [o.token_ids for o in eager.generate(ps, GREEDY, use_tqdm=False)]
    llm = LLM(qwen3, **kw)
    capture_on_cpu(llm.model_runner)
    got = [o.token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)]
    assert got == ref
    replays = {key: g.replays for key, (g, _) in llm.model_runner.graphs.items()}
    assert sum(n for (k, _), n in replays.items() if k == DECODE_GRAPH) > 0
    if policy == "chunked":   # prefill_first never mixes; its prefill-only steps use mixed graphs
        assert sum(n for (k, _), n in replays.items() if k == MIXED_GRAPH) > 0
    assert sum(r["num_preempted"] for r in llm.step_records) > 0
    assert sum(r["prefix_hit_tokens"] for r in llm.step_records) > 0


def test_fused_layers_match_reference_path(qwen3):
    """The triton backend's fused elementwise kernels against the torch backend's layers."""
    ps = prompts([5, 11, 23], 3)
    kw = dict(device="cpu", dtype="float32", num_gpu_blocks=64, max_model_len=64)
    ref = [o.token_ids for o in LLM(qwen3, **kw, attention_backend="torch").generate(ps, GREEDY, use_tqdm=False)]
    llm = LLM(qwen3, **kw, attention_backend="triton")
    assert all(m.fused for m in llm.model_runner.model.modules() if hasattr(m, "fused"))
    assert [o.token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)] == ref


def test_dummy_batch_shapes():
    b = dummy_batch([(5, 5), (9, 1)], 4)
    assert b.num_new_tokens == [5, 1] and b.num_computed_tokens == [0, 8]
    assert [len(s.block_table) for s in b.seqs] == [2, 3]


def test_views_first_made_in_inference_mode_stay_writable():
    """A shape's views are cached on first use, and that use may be warm-up or CUDA-graph
    capture (inference mode). TP's rank 0 later writes the resolved pending tokens into the
    input_ids view outside inference mode; a view made as an inference tensor refuses that
    (the H200's TP=2 start-up failure of session 12)."""
    buffer = packer().buffer
    with torch.inference_mode():
        _, _, device = buffer.views(8, 2, 4, 2, 2, 2)
    _, _, again = buffer.views(8, 2, 4, 2, 2, 2)
    assert all(a is b for a, b in zip(device, again))      # served from the cache
    for view in device:
        assert not view.is_inference()
        view.zero_()                                        # in place, outside inference mode
