"""The whole step inside the (emulated) CUDA graph: pending input tokens, model, logits rows,
LM head and the fused sampler run in ModelRunner.graph_body, the callable CUDA captures; here
tests/test_step_inputs.py's ReplayOnCpu re-runs it on each replay, as a graph re-runs its
kernels over the same addresses. Sampling must stay right under replay: fresh noise every
step (the step buffer carries the Philox seeds), the same tokens as an eager step on the same
sampler path, greedy rows as torch.argmax, top-k/top-p steps sampled eagerly after replay."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.checkpoint import tiny_config, write_random_checkpoint
from engine.step_inputs import DECODE_GRAPH, EAGER, MIXED_GRAPH, take_pending
from tests.test_step_inputs import capture_on_cpu

# the torch attention path (fast on a CPU); decode graphs only (mixed graphs pad tokens that
# belong to no sequence, which only the Triton kernels accept)
KW = dict(device="cpu", dtype="float32", attention_backend="torch", num_gpu_blocks=64,
          block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
          cuda_graph_max_tokens=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_random_checkpoint(tiny_config("qwen3"), tmp_path_factory.mktemp("ckpt") / "q",
                                       dtype="float32", seed=0, std=0.3))


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def engine(ckpt, graphs: bool, fused: bool = True, **kw) -> LLM:
    """An engine whose sampler takes the fused (Triton, interpreted) path like on CUDA, with
    emulated decode graphs or eager steps only."""
    llm = LLM(ckpt, **KW, **kw)
    llm.model_runner.sampler.fused = fused
    if graphs:
        capture_on_cpu(llm.model_runner, kinds=(DECODE_GRAPH,))
    return llm


def replays(llm) -> int:
    return sum(g.replays for g, _ in llm.model_runner.graphs.values())


def test_take_pending_reads_only_negative_ids():
    tokens = torch.tensor([40, 41, 42, 43])
    ids = torch.tensor([5, -1, 7, -4, 0, -3])
    assert take_pending(ids, tokens).tolist() == [5, 40, 7, 43, 0, 42]
    assert take_pending(torch.tensor([3, 0, 9]), tokens).tolist() == [3, 0, 9]


def test_sampling_in_graphs_equals_eager_steps(ckpt):
    """Unseeded and seeded temperature sampling, mixed with greedy requests and run with
    asynchronous scheduling (pending tokens read inside the graph): graph replays give the
    tokens of synchronous eager steps (every input token from the host) exactly, and greedy
    requests keep torch.argmax's tokens."""
    ps = prompts([3, 9, 17, 5, 12])
    params = [SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=1234, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=1.3, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)]
    eager = engine(ckpt, graphs=False, async_scheduling=False)
    ref = [o.token_ids for o in eager.generate(ps, params, use_tqdm=False)]
    llm = engine(ckpt, graphs=True)
    got = [o.token_ids for o in llm.generate(ps, params, use_tqdm=False)]
    assert replays(llm) > 0 and llm.async_scheduling
    assert got == ref
    # greedy rows: the graph's fused sampler picks what torch.argmax picks on the torch path
    torch_path = engine(ckpt, graphs=False, fused=False, async_scheduling=False)
    greedy = [o.token_ids for o in torch_path.generate([ps[1], ps[4]], params[1], use_tqdm=False)]
    assert [got[1], got[4]] == greedy


def test_replays_draw_fresh_noise(ckpt):
    """One prompt at a high temperature: every step replays the same batch-1 graph, and the
    draws still vary (the seed moves with the step); a seeded request repeats its tokens
    on a fresh engine and differs from another seed's."""
    hot = SamplingParams(temperature=5.0, max_tokens=24, ignore_eos=True)
    llm = engine(ckpt, graphs=True)
    out = llm.generate(prompts([6]), hot, use_tqdm=False)[0].token_ids
    assert replays(llm) >= 20
    assert len(set(out)) > 8      # vocab 512 at T=5: a stuck draw would repeat one token
    seeded = [SamplingParams(temperature=5.0, seed=s, max_tokens=12, ignore_eos=True) for s in (7, 7, 8)]
    a, b, c = (o.token_ids for o in engine(ckpt, graphs=True).generate(prompts([6]) * 3, seeded, use_tqdm=False))
    assert a == b != c


def test_top_k_steps_resample_after_replay(ckpt):
    """A graph samples without top-k/top-p; a step that uses them samples again eagerly from
    the graph's logits: top_k=1 at any temperature is greedy."""
    ps = prompts([4, 7])
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    top1 = SamplingParams(temperature=3.0, top_k=1, max_tokens=8, ignore_eos=True)
    ref = [o.token_ids for o in engine(ckpt, graphs=False).generate(ps, greedy, use_tqdm=False)]
    llm = engine(ckpt, graphs=True)
    assert [o.token_ids for o in llm.generate(ps, top1, use_tqdm=False)] == ref
    assert replays(llm) > 0


# ---- the decode-only packing path ----------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_pack_decode_writes_what_pack_any_writes(seed):
    """StepPacker.pack (decode-only steps go through pack_decode, their fast path) against the
    general pack_any on the same stream of decode batches: the same bytes in the step buffer
    and the same Step, eager, padded to decode graphs, and on mixed graphs (which pack hands
    to pack_any), with pending tokens, greedy/temperature/top-k/seeded rows, sequences whose
    tables grow a block or get replaced (preemption)."""
    from engine.step_inputs import Step
    from policy import Batch, Sequence
    from tests.test_step_inputs import packer

    rng = random.Random(seed)
    fast, ref = packer(max_seqs=8), packer(max_seqs=8)
    kind = (EAGER, DECODE_GRAPH, MIXED_GRAPH)[seed % 3]
    for p in (fast, ref):
        p.decode_sizes = [1, 2, 4, 8] if kind == DECODE_GRAPH else []
        p.mixed_sizes = [2, 4, 8, 16] if kind == MIXED_GRAPH else []
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8),
             SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0.7, seed=3)]
    seqs = [Sequence(i, [rng.randrange(1, 999) for _ in range(rng.randrange(1, 40))], 4) for i in range(8)]
    next_block = 1
    for s in seqs:
        s.block_table = list(range(next_block, next_block + -(-s.num_tokens // 4)))
        next_block += len(s.block_table)
    previous, seen = None, set()
    for step_no in range(12):
        live = rng.sample(seqs, rng.randrange(1, 9))
        for s in live:
            s.token_ids.append(rng.randrange(1, 999))   # the token decoded last step
            s.num_tokens += 1
            if rng.random() < 0.1:                      # preempted and re-allocated
                s.block_table = []
            while len(s.block_table) * 4 < s.num_tokens:
                s.block_table.append(next_block)
                next_block += 1
        batch = Batch(seqs=live, num_new_tokens=[1] * len(live),
                      num_computed_tokens=[s.num_tokens - 1 for s in live],
                      sample=[True] * len(live), num_batched_tokens=len(live))
        params = [rng.choice(kinds) for _ in live]
        a, b = (pack(batch, params, previous) for pack in (fast.pack, ref.pack_any))
        assert fast.buffer.host_np[:a.nbytes].tobytes() == ref.buffer.host_np[:b.nbytes].tobytes()
        same = [f for f in Step.__slots__ if f != "sampling"]
        assert [getattr(a, f) for f in same] == [getattr(b, f) for f in same]
        assert (a.sampling.all_greedy, a.sampling.any_greedy, a.sampling.use_top_k, a.sampling.seeds) == \
               (b.sampling.all_greedy, b.sampling.any_greedy, b.sampling.use_top_k, b.sampling.seeds)
        seen |= {("pending", a.F > 0), ("graph", a.graph)}
        # the previous step sampled some of these sequences' last tokens (still on the device)
        previous = {s.seq_id: k for k, s in enumerate(live) if rng.random() < 0.7}
    assert ("pending", True) in seen and ("graph", kind) in seen
