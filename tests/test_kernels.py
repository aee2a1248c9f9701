"""The engine's Triton kernels against a float64 torch reference, under the Triton interpreter.

The reference gathers each sequence's KV through its block table, repeats KV heads for GQA and
applies the causal rule of the step contract: query i of a sequence with q_len queries and
context_len keys sits at position context_len - q_len + i. Inputs are random normals; outputs
are poisoned with NaN before each call so an unwritten row fails. Shapes stay tiny: the
interpreter runs every program in numpy.

On a GPU machine, `TRITON_INTERPRET=0 pytest tests/test_kernels.py` runs the same checks on the
compiled kernels (CUDA tensors; the reference still runs on the CPU).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from engine.kernels import (choose_num_splits, paged_attention, paged_decode_attention,  # noqa: E402
                            paged_prefill_attention, store_kvcache)
from engine.kernels.launch import (DECODE_BLOCK_N, MAX_SPLITS, MIN_TOKENS_PER_SPLIT,  # noqa: E402
                                   SPLIT_SLACK, decode_work_capacity, plan_decode_work)
from policy.decode_plan import DecodePlan  # noqa: E402
from engine.kernels.paged_attention import _decode_kernel  # noqa: E402

DEVICE = "cuda" if os.environ["TRITON_INTERPRET"] == "0" else "cpu"

# Triton picks interpreter or compiler when a kernel is decorated, i.e. at first import.
if DEVICE == "cpu" and type(_decode_kernel).__name__ != "InterpretedFunction":
    raise RuntimeError("engine.kernels was imported before TRITON_INTERPRET=1 was set; on a CPU-only "
                       "machine set it in tests/conftest.py (or the environment) before anything imports triton")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # ||out-ref||/||ref||


def reference_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale):
    q, k_cache, v_cache, block_tables, context_lens, query_start_loc = (
        t.cpu() for t in (q, k_cache, v_cache, block_tables, context_lens, query_start_loc))
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(context_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        ctx, q_len = int(context_lens[b]), end - start
        if q_len == 0 or ctx == 0:
            continue
        pos = torch.arange(ctx)
        blocks = block_tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        v = v_cache[blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].double(), k) * scale
        q_pos = ctx - q_len + torch.arange(q_len)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def make_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, spare_blocks=3):
    """seqs: list of (q_len, context_len). Blocks are shuffled over a pool with spare blocks,
    and unused block-table entries are -1, so a read past a context would fault or differ."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(blocks_needed) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_needed) + 1
    block_tables = torch.full((len(seqs), width), -1, dtype=torch.int32)
    for b, n in enumerate(blocks_needed):
        block_tables[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    q_lens = [q_len for q_len, _ in seqs]
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    context_lens = torch.tensor([ctx for _, ctx in seqs], dtype=torch.int32)
    return on_device(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)


def on_device(*tensors):
    return tuple(t.to(DEVICE) for t in tensors)


def rel_error(out, ref):
    assert torch.isfinite(out).all(), "kernel left NaN/inf in the output (unwritten rows?)"
    return ((out.cpu().double() - ref).norm() / ref.norm()).item()


def poisoned(q):
    return torch.full_like(q, float("nan"))


# ---------------------------------------------------------------------------------- store_kvcache

@pytest.mark.parametrize("block_size", [1, 16, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kvcache_writes_mapped_slots_and_skips_minus_one(block_size, dtype):
    gen = torch.Generator().manual_seed(block_size)
    num_kv_heads, head_dim, n = 2, 64, 9
    num_blocks = -(-2 * n // block_size) + 1  # room for every slot, with slots left untouched
    # key/value as strided views of a fused projection, the way the model produces them
    qkv = torch.randn(n, 3 * num_kv_heads * head_dim, generator=gen).to(dtype)
    key = qkv[:, num_kv_heads * head_dim:2 * num_kv_heads * head_dim].view(n, num_kv_heads, head_dim)
    value = qkv[:, 2 * num_kv_heads * head_dim:].view(n, num_kv_heads, head_dim)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[[1, 4]] = -1
    key, value, k_cache, v_cache, slots = on_device(key, value, k_cache, v_cache, slots)
    k_before, v_before = on_device(k_before, v_before)
    store_kvcache(key, value, k_cache, v_cache, slots)

    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    written = slots[slots >= 0]
    assert torch.equal(flat_k[written], key[slots >= 0])
    assert torch.equal(flat_v[written], value[slots >= 0])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    assert torch.equal(flat_k[untouched], k_before.view(-1, num_kv_heads, head_dim)[untouched])
    assert torch.equal(flat_v[untouched], v_before.view(-1, num_kv_heads, head_dim)[untouched])


def test_store_kvcache_rejects_mismatched_inputs():
    key, cache = on_device(torch.randn(4, 2, 64), torch.randn(3, 16, 2, 64))
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kvcache(key, key, cache, cache.clone(), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="dtypes differ"):
        store_kvcache(key.bfloat16(), key.bfloat16(), cache, cache.clone(), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="heads/dim"):
        store_kvcache(key, key, torch.randn(3, 16, 4, 32), torch.randn(3, 16, 4, 32),
                      torch.zeros(4, dtype=torch.int64))


# ---------------------------------------------------------------------------------------- decode

# (group, block_size, num_splits, dtype, head_dim): GQA 1/2/4/8, block sizes 1..256 (24 is not a
# power of two), split-KV off, on (more splits than some contexts have tiles) and automatic.
DECODE_CASES = [
    (1, 16, 1, torch.float32, 64),
    (2, 16, None, torch.bfloat16, 128),
    (4, 32, 4, torch.float32, 64),
    (8, 64, 2, torch.bfloat16, 64),
    (2, 1, 3, torch.float32, 64),
    (4, 24, 1, torch.bfloat16, 64),
    (2, 256, 2, torch.float32, 64),
    (8, 16, 5, torch.float32, 64),
    (2, 128, None, torch.float16, 64),
    (2, 16, 2, torch.float32, 80),  # head_dim padded to 128
]


@pytest.mark.parametrize("group,block_size,num_splits,dtype,head_dim", DECODE_CASES)
def test_decode_matches_reference(group, block_size, num_splits, dtype, head_dim):
    num_kv_heads = 2
    seqs = [(1, 1), (1, 37), (1, 150), (1, 64), (1, 200)]
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(
        seqs, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, seed=group + block_size)
    scale = head_dim ** -0.5
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, scale)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                 num_splits, out=poisoned(q))
    assert rel_error(out, ref) < TOLERANCE[dtype]
    # the unified entry point dispatches the same batch to the same kernel
    out = paged_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, 1, 200, scale,
                          num_splits, out=poisoned(q))
    assert rel_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_padding_rows_are_zero(num_splits):
    """CUDA-graph padding rows have context_len 0 and a junk block table: output 0, no NaN."""
    seqs = [(1, 70), (1, 1), (1, 20)]
    q, k_cache, v_cache, block_tables, context_lens, _ = make_batch(seqs, 4, 2, 64, 16, torch.float32, seed=7)
    pad_q, pad_ctx, pad_bt = on_device(torch.randn(2, 4, 64), torch.zeros(2, dtype=torch.int32),
                                       torch.full((2, block_tables.shape[1]), -1, dtype=torch.int32))
    q, context_lens, block_tables = torch.cat([q, pad_q]), torch.cat([context_lens, pad_ctx]), torch.cat([block_tables, pad_bt])
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.125, num_splits,
                                 out=poisoned(q))
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))
    qsl = torch.arange(6, dtype=torch.int32, device=DEVICE)
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, 0.125)
    assert rel_error(out[:3], ref[:3]) < TOLERANCE[torch.float32]


def test_choose_num_splits_fills_the_gpu_without_tiny_splits():
    sms = 132
    # many (sequence, kv head) programs already: no split
    assert choose_num_splits(256, 8, 1024, sms) == 1
    # one sequence with a long context: split, but each split keeps MIN_TOKENS_PER_SPLIT tokens
    s = choose_num_splits(1, 8, 4096, sms)
    assert 1 < s <= min(MAX_SPLITS, 4096 // MIN_TOKENS_PER_SPLIT)
    # a short context is not split below the minimum
    assert choose_num_splits(1, 8, MIN_TOKENS_PER_SPLIT, sms) == 1
    # more sequences never ask for more splits
    splits = [choose_num_splits(b, 8, 4096, sms) for b in (1, 2, 4, 16, 64, 256)]
    assert splits == sorted(splits, reverse=True)
    assert all(1 <= s <= MAX_SPLITS for s in splits)


def test_decode_work_plan_partitions_every_context():
    """plan_decode_work: each decode sequence's items tile [0, context) in order without gaps
    or overlaps, no item is longer than the plan's share, at most MAX_SPLITS shares a
    sequence, never more items than decode_work_capacity, and unused items are marked."""
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 300)
        sms, kv_heads = rng.choice([(132, 8), (132, 1), (78, 4), (4, 2)])
        ctx = np.array([rng.choice([1, rng.randint(1, 200), rng.randint(1, 40000)]) for _ in range(n)])
        cap = decode_work_capacity(n, DecodePlan(kv_heads, sms))
        items = np.full((cap + 3, 4), 7, dtype=np.int32)
        index = np.full((n, 2), 7, dtype=np.int32)
        count = plan_decode_work(ctx, DecodePlan(kv_heads, sms), items, index)
        assert count <= cap and (items[count:, 0] == -1).all()
        lengths = items[:count, 2] - items[:count, 1]
        assert (lengths > 0).all()
        for b in range(n):
            first, shares = index[b]
            mine = items[first:first + shares]
            assert 1 <= shares <= MAX_SPLITS and (mine[:, 0] == b).all() and (mine[:, 3] == shares).all()
            assert mine[0, 1] == 0 and mine[-1, 2] == ctx[b] and (mine[1:, 1] == mine[:-1, 2]).all()
            # a sequence's shares are whole tiles, as even as tiles allow
            sizes = mine[:, 2] - mine[:, 1]
            assert (sizes[:-1] % DECODE_BLOCK_N == 0).all() and (sizes[:-1] == sizes[0]).all()
            assert 0 < sizes[-1] <= sizes[0]
        # balanced: no item is much longer than the equal share of the total context (a
        # sequence up to SPLIT_SLACK shares long may stay whole)
        chunk = max(MIN_TOKENS_PER_SPLIT, -(-int(ctx.sum()) // (cap - n)), -(-int(ctx.max()) // MAX_SPLITS))
        assert lengths.max() <= SPLIT_SLACK * chunk + 2 * DECODE_BLOCK_N
        # and a sequence is split only when it is longer than SPLIT_SLACK shares
        assert all(index[b, 1] == 1 for b in range(n) if ctx[b] <= SPLIT_SLACK * chunk)


@pytest.mark.parametrize("group,block_size,dtype,sms", [
    (1, 16, torch.float32, 132), (4, 1, torch.float32, 8), (8, 64, torch.bfloat16, 4), (2, 24, torch.float16, 2)])
def test_decode_work_list_matches_reference(group, block_size, dtype, sms):
    """The runner's decode launch: a host work list (a few SMs so long contexts split into
    many shares, short ones stay whole), padded with unused items, over rows addressed by
    query_start_loc; sequences after the decodes (prefill rows) are left alone."""
    num_kv_heads, head_dim = 2, 64
    seqs = [(1, 300), (1, 1), (1, 37), (1, 129), (1, 700), (5, 40)]
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(
        seqs, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, seed=group * block_size)
    num_decode = 5
    cap = decode_work_capacity(num_decode, DecodePlan(num_kv_heads, sms)) + 2
    items, index = np.zeros((cap, 4), np.int32), np.zeros((len(seqs), 2), np.int32)
    count = plan_decode_work(context_lens[:num_decode].cpu().numpy(), DecodePlan(num_kv_heads, sms), items, index)
    assert count > num_decode or sms == 132   # the small "GPUs" split the long contexts
    work = on_device(torch.from_numpy(items), torch.from_numpy(index))
    scale = head_dim ** -0.5
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, scale)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                 out=poisoned(q), query_start_loc=qsl, work=work)
    rows = qsl[:num_decode].long()
    assert rel_error(out[rows], ref[rows.cpu()]) < TOLERANCE[dtype]
    assert torch.isnan(out[int(qsl[num_decode]):]).all()   # the prefill row's queries: untouched


# --------------------------------------------------------------------------------------- prefill

SCENARIOS = {
    "fresh_prompts": [(23, 23), (70, 70), (1, 1)],
    "chunked_prefill": [(30, 95), (64, 64), (17, 160)],     # q_len < context: earlier chunks cached
    "prefix_hit": [(9, 73), (40, 104)],                      # context - q_len = whole cached blocks
    "mixed_batch": [(1, 57), (33, 33), (1, 130), (12, 90), (1, 1)],  # decodes next to prefills
}


@pytest.mark.parametrize("scenario,group,block_size,dtype", [
    ("fresh_prompts", 1, 16, torch.float32),
    ("fresh_prompts", 4, 24, torch.bfloat16),
    ("chunked_prefill", 2, 16, torch.float32),
    ("chunked_prefill", 8, 64, torch.bfloat16),
    ("prefix_hit", 2, 32, torch.float32),
    ("prefix_hit", 4, 1, torch.float32),
    ("mixed_batch", 2, 16, torch.bfloat16),
    ("mixed_batch", 8, 256, torch.float32),
    ("mixed_batch", 1, 64, torch.float16),
])
def test_prefill_matches_reference(scenario, group, block_size, dtype):
    seqs = SCENARIOS[scenario]
    num_kv_heads, head_dim = 2, 64
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(
        seqs, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, seed=block_size + group)
    scale = head_dim ** -0.5
    max_q, max_ctx = max(s[0] for s in seqs), max(s[1] for s in seqs)
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, scale)
    out = paged_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, max_q, max_ctx, scale,
                          out=poisoned(q))
    assert rel_error(out, ref) < TOLERANCE[dtype]


def test_prefill_kernel_also_serves_single_token_batches():
    """paged_prefill_attention accepts decode-only batches too (q_len 1 everywhere)."""
    seqs = [(1, 40), (1, 3)]
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(seqs, 8, 2, 128, 16, torch.float32, seed=3)
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, 0.1)
    out = paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, 1, 0.1, out=poisoned(q))
    assert rel_error(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_match_reference(seed):
    rng = random.Random(seed)
    group = rng.choice([1, 2, 4, 8])
    block_size = rng.choice([1, 16, 24, 32, 64])
    dtype = rng.choice([torch.float32, torch.bfloat16])
    seqs = []
    for _ in range(rng.randint(1, 4)):
        ctx = rng.randint(1, 140)
        seqs.append((rng.choice([1, rng.randint(1, ctx)]), ctx))
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(
        seqs, 2 * group, 2, 64, block_size, dtype, seed=seed)
    max_q, max_ctx = max(s[0] for s in seqs), max(s[1] for s in seqs)
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, 0.125)
    out = paged_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, max_q, max_ctx, 0.125,
                          num_splits=rng.randint(1, 4), out=poisoned(q))
    assert rel_error(out, ref) < TOLERANCE[dtype], (seqs, group, block_size, dtype)


def test_store_then_attend_equals_dense_causal_attention():
    """The engine's sequence of calls: a prompt in two chunks, then a decode step; each step
    stores its K/V through slot_mapping and attends. Compared with dense causal attention."""
    gen = torch.Generator().manual_seed(11)
    block_size, num_heads, num_kv_heads, head_dim, total = 16, 4, 2, 64, 45
    q_all = torch.randn(total, num_heads, head_dim, generator=gen)
    k_all = torch.randn(total, num_kv_heads, head_dim, generator=gen)
    v_all = torch.randn(total, num_kv_heads, head_dim, generator=gen)
    k_cache = torch.randn(6, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(6, block_size, num_kv_heads, head_dim, generator=gen)
    block_table = torch.tensor([[4, 1, 5]], dtype=torch.int32)
    q_all, k_all, v_all, k_cache, v_cache, block_table = on_device(q_all, k_all, v_all, k_cache, v_cache, block_table)
    outs = []
    for start, end in [(0, 30), (30, 44), (44, 45)]:
        pos = torch.arange(start, end, device=DEVICE)
        slots = block_table[0, pos // block_size].long() * block_size + pos % block_size
        store_kvcache(k_all[start:end], v_all[start:end], k_cache, v_cache, slots)
        qsl, ctx = on_device(torch.tensor([0, end - start], dtype=torch.int32), torch.tensor([end], dtype=torch.int32))
        outs.append(paged_attention(q_all[start:end], k_cache, v_cache, block_table, ctx, qsl, end - start, end,
                                    head_dim ** -0.5, out=poisoned(q_all[start:end])))
    k = k_all.cpu().repeat_interleave(2, dim=1).transpose(0, 1).double()
    v = v_all.cpu().repeat_interleave(2, dim=1).transpose(0, 1).double()
    dense = torch.nn.functional.scaled_dot_product_attention(
        q_all.cpu().transpose(0, 1).double(), k, v, is_causal=True).transpose(0, 1)
    assert rel_error(torch.cat(outs), dense) < TOLERANCE[torch.float32]


# ------------------------------------------------------------------------------------ validation

def test_attention_rejects_bad_inputs_with_clear_errors():
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch([(1, 10), (1, 20)], 4, 2, 64, 16,
                                                                      torch.float32, seed=0)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                context_lens=context_lens, scale=0.1)
    small = on_device(torch.randn(2, 4, 8), torch.randn(4, 16, 2, 8))
    bad = [
        (dict(q=q[:, :3]), "multiple of num_kv_heads"),
        (dict(q=small[0], k_cache=small[1], v_cache=small[1]), "head_dim 8 unsupported"),
        (dict(q=q.bfloat16()), "dtypes differ"),
        (dict(block_tables=block_tables.long()), "block_tables must be int32"),
        (dict(context_lens=context_lens.long()), "context_lens must be int32"),
        (dict(v_cache=v_cache[:, :, :, :32]), "k_cache/v_cache"),
        (dict(q=torch.cat([q, q[:1]])), "3 rows"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            paged_decode_attention(**{**args, **change})
    with pytest.raises(ValueError, match="out must match q"):
        paged_decode_attention(**args, out=torch.empty_like(q, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(q, k_cache, v_cache, block_tables, context_lens, qsl[:2], 1, 20, 0.1)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(**args, num_splits=0)


@pytest.mark.parametrize("seed", range(4))
def test_mixed_step_launch_shape_matches_reference(seed):
    """The runner's graph-safe launch of a mixed step: the decode kernel over a grid of
    padded rows (skipping prefill and padding rows by query_start_loc) plus the prefill
    kernel over a tile list padded with b = -1. Every real query row is written, once, and
    matches the reference; padding rows and tiles do nothing."""
    from engine.kernels.launch import prefill_tile_tokens
    rng = random.Random(100 + seed)
    group, dtype = rng.choice([1, 2, 4]), rng.choice([torch.float32, torch.bfloat16])
    seqs = [(1, rng.randint(1, 150)) for _ in range(rng.randint(1, 4))]     # decodes first
    for _ in range(rng.randint(1, 3)):
        ctx = rng.randint(2, 150)
        seqs.append((rng.randint(2, ctx), ctx))
    q, k_cache, v_cache, block_tables, context_lens, qsl = make_batch(
        seqs, 2 * group, 2, 64, rng.choice([1, 16, 24]), dtype, seed=seed)
    ref = reference_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, 0.125)
    pad = rng.randint(1, 3)                                   # padding sequences, q_len 0
    T = q.shape[0]
    qsl_p = torch.cat([qsl.cpu(), torch.full((pad,), T, dtype=torch.int32)]).to(DEVICE)
    ctx_p = torch.cat([context_lens.cpu(), torch.zeros(pad, dtype=torch.int32)]).to(DEVICE)
    tables_p = torch.cat([block_tables.cpu(), torch.zeros(pad, block_tables.shape[1], dtype=torch.int32)]).to(DEVICE)
    tile = prefill_tile_tokens(q.shape[1], 2, dtype)
    tiles = [(b, t) for b, (q_len, _) in enumerate(seqs) if q_len > 1 for t in range(-(-q_len // tile))]
    tiles += [(-1, 0)] * rng.randint(1, 5)
    tiles = torch.tensor(tiles, dtype=torch.int32, device=DEVICE)
    out = poisoned(q)
    paged_decode_attention(q, k_cache, v_cache, tables_p, ctx_p, 0.125, rng.randint(1, 4), out=out,
                           query_start_loc=qsl_p)
    paged_prefill_attention(q, k_cache, v_cache, tables_p, ctx_p, qsl_p, 0, 0.125, out=out, tiles=tiles)
    assert rel_error(out, ref) < TOLERANCE[dtype], (seqs, group, dtype)
