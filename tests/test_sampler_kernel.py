"""The fused sampling kernel (engine.kernels.sample_from_logits) under the Triton interpreter,
and the Sampler's fused path. Each row costs the interpreter ~10 ms, so sizes stay small."""
import pytest
import torch

from engine.kernels import sample_from_logits
from engine.sampler import Sampler, SamplingTensors, as_int64


def sample(logits, temperatures, seeds=None, offsets=None, **kw):
    """sample_from_logits with a float/list temperature and default seeds (7) / offsets (row)."""
    S = logits.shape[0]
    temps = torch.as_tensor(temperatures, dtype=torch.float32).expand(S).contiguous()
    seeds = torch.full((S,), 7, dtype=torch.int64) if seeds is None else torch.as_tensor(seeds)
    offsets = torch.arange(S) if offsets is None else torch.as_tensor(offsets)
    return sample_from_logits(logits, temps, seeds, offsets, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax_with_ties_to_the_lowest_index(dtype):
    gen = torch.Generator().manual_seed(0)
    V = 1000                               # quarters of 256 (the last one 232), chunks of 16
    logits = torch.randn(6, V, generator=gen).to(dtype)
    logits[1, [900, 3, 600]] = 9.0         # ties across quarters and chunks: 3 wins
    logits[2, [700, 40, 260]] = 9.0        # the lowest (40) is not in the first quarter seen
    logits[3] = float("-inf")              # like torch.argmax: 0
    logits[4, V - 1] = 9.0                 # the last id, in the short last quarter
    tokens = sample(logits, 0.0, block_size=16)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert tokens[1:5].tolist() == [3, 40, 0, V - 1]


def test_distribution_matches_softmax():
    """Chi-square of 400 draws per temperature against softmax(logits / T). 8 bins: 7
    degrees of freedom, whose 0.999 quantile is 24.32; the seeds are fixed, so the test is
    deterministic. A temperature off by a factor ln 2 (mixing log bases) gives a statistic
    of ~7 + 32 at T = 0.6, far above the bound."""
    logits = torch.tensor([1.2, 0.6, 0.1, -0.3, -0.8, 0.9, -1.4, 0.3])
    n = 400
    for temperature, seed in ((0.6, 11), (1.7, 12)):
        tokens = sample(logits.expand(n, -1).contiguous(), temperature,
                        seeds=torch.full((n,), seed))
        counts = torch.bincount(tokens, minlength=8).double()
        expected = n * torch.softmax(logits.double() / temperature, dim=0)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 24.32, (temperature, counts.tolist(), expected.tolist())


def test_seeded_row_ignores_its_batch_and_position():
    gen = torch.Generator().manual_seed(1)
    V = 300
    row = torch.randn(V, generator=gen) * 0.1     # flat: the draw hangs on the noise
    others = torch.randn(4, V, generator=gen)
    alone = sample(row[None], 1.0, seeds=[123], offsets=[5])
    # at row 3 of a batch with other rows, temperatures, seeds; and other chunking
    batch = torch.cat([others[:3], row[None], others[3:]])
    tokens = sample(batch, [0.0, 2.0, 0.5, 1.0, 1.0], seeds=[1, 2, 3, 123, 4],
                    offsets=[0, 1, 5, 5, 9], block_size=16)
    assert tokens[3] == alone[0]


def test_seeds_and_offsets_change_the_draw():
    gen = torch.Generator().manual_seed(2)
    V, n = 300, 12
    logits = (torch.randn(V, generator=gen) * 0.1).expand(n, -1).contiguous()
    base = sample(logits, 1.0, seeds=torch.full((n,), 5), offsets=torch.zeros(n, dtype=torch.int64))
    assert len(set(base.tolist())) == 1            # the same (seed, offset): the same token
    by_seed = sample(logits, 1.0, seeds=torch.arange(n) + 2**40 + 3,
                     offsets=torch.zeros(n, dtype=torch.int64))
    by_offset = sample(logits, 1.0, seeds=torch.full((n,), 5), offsets=torch.arange(n) << 33)
    assert len(set(by_seed.tolist())) > n // 2
    assert len(set(by_offset.tolist())) > n // 2
    # 64-bit seeds: the high half matters
    high = sample(logits, 1.0, seeds=torch.full((n,), 5) + (torch.arange(n) << 40),
                  offsets=torch.zeros(n, dtype=torch.int64))
    assert len(set(high.tolist())) > n // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_row_odd_vocab_and_row_stride(dtype):
    """S = 1 over several chunks, a vocab that is no multiple of the chunk, and rows of a
    wider buffer whose padding columns would win if the kernel read them."""
    V = 1001
    buffer = torch.full((3, V + 37), 1e4, dtype=dtype)
    logits = buffer[:, :V]
    logits.copy_(torch.randn(3, V, generator=torch.Generator().manual_seed(3)))
    logits[0, V - 1] = 40.0                # dominant: a temperature-1 draw still picks it
    for t in (0.0, 1.0):
        token = sample(logits[:1], t, block_size=32)
        assert token.tolist() == [V - 1]
    tokens = sample(logits, [0.0, 2.0, 5.0], block_size=64)
    assert tokens[0] == V - 1 and bool(((tokens >= 0) & (tokens < V)).all())


# ---- the Sampler's fused path ---------------------------------------------------------------

def params(temperatures, seeds=(), top_k=False):
    temps = torch.tensor(temperatures, dtype=torch.float32)
    S = len(temperatures)
    greedy = [t == 0 for t in temperatures]
    return SamplingTensors(temps, torch.full((S,), 1 if top_k else 10**9, dtype=torch.int64),
                           torch.ones(S), all_greedy=all(greedy), any_greedy=any(greedy),
                           use_top_k=top_k, use_top_p=False, seeds=list(seeds))


def test_fused_sampler_greedy_rows_seeds_and_stream():
    gen = torch.Generator().manual_seed(4)
    V, S = 200, 8
    logits = torch.randn(S, V, generator=gen) * 0.1
    temps = [0.0, 1.0] * (S // 2)
    fused = Sampler(torch.device("cpu"), seed=0, fused=True)
    tokens = fused(logits, params(temps))
    greedy = Sampler(torch.device("cpu"), seed=0)(logits, params([0.0] * S))
    assert torch.equal(tokens[::2], greedy[::2])
    assert bool(((tokens >= 0) & (tokens < V)).all())
    # the engine-wide stream moves on every step, and follows the Sampler's seed
    again = fused(logits, params(temps))
    assert not torch.equal(tokens[1::2], again[1::2])
    assert torch.equal(Sampler(torch.device("cpu"), seed=0, fused=True)(logits, params(temps)),
                       tokens)
    # a seeded row (a 64-bit seed) keeps its token whatever its row, neighbours and step
    seed = 2**64 - 12345
    first = fused(logits[:1], params([1.0], seeds=[(0, seed)]))
    moved = torch.cat([logits[3:6], logits[:1]])
    assert fused(moved, params([1.0, 0.0, 1.0, 1.0], seeds=[(3, seed), (0, 99)]))[3] == first[0]
    # top-k steps keep the torch path: top_k = 1 is greedy
    assert torch.equal(fused(logits, params([1.0] * S, top_k=True)), logits.argmax(-1))


def test_as_int64_keeps_the_bits():
    assert as_int64(5) == 5
    assert as_int64(2**64 - 1) == -1
    assert as_int64(2**63) == -2**63
