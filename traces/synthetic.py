"""Generated workloads: arrival processes, sampled lengths, and prompts that share content.

Content is expressed as Mooncake-style `hash_ids` (one id per `hash_block_size` tokens,
equal ids = equal tokens). `materialize` turns a hash id into tokens that depend on the id
alone, and a last partial block is the first tokens of that same block, so any prompt that
is a token-level prefix of another is the same id list cut short. That is all the two
generators need: a shared system prompt is a shared run of ids, and a conversation is one
long chain of ids whose every turn reads a longer piece of it.
"""
import math

import numpy as np
import pandas as pd

from traces.config import TraceConfig

# Independent random streams per purpose, so adding a column never shifts another's draws.
ARRIVAL_STREAM, LENGTH_STREAM, GROUP_STREAM = 1, 2, 3
DEFAULT_NUM_REQUESTS = 1000
MAX_HASH_BLOCK = 512


def rng_for(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def arrival_times(process: str, n: int, rate: float, cv: float,
                  rng: np.random.Generator) -> np.ndarray:
    """`n` non-decreasing arrival times in seconds; the first request arrives at 0 and the
    gaps between consecutive ones have mean 1/rate ("burst": all at 0)."""
    if process == "burst":
        return np.zeros(n)
    if process == "constant":
        gaps = np.full(max(n - 1, 0), 1.0 / rate)
    elif process == "poisson":
        gaps = rng.exponential(1.0 / rate, max(n - 1, 0))
    elif process == "gamma":
        # shape k gives CV 1/sqrt(k); the scale keeps the mean gap at 1/rate
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), max(n - 1, 0))
    else:
        raise ValueError(f"unknown arrival process {process!r}")
    return np.concatenate([[0.0], np.cumsum(gaps)])[:n]


def sample_lengths(cfg: TraceConfig, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` positive lengths for `kind` ("prompt" or "output") per `cfg.length_dist`."""
    mean, bounds = getattr(cfg, f"{kind}_len"), getattr(cfg, f"{kind}_len_range")
    if cfg.length_dist == "fixed":
        return np.full(n, mean, dtype=np.int64)
    if cfg.length_dist == "uniform":
        return rng.integers(bounds[0], bounds[1] + 1, n)
    # lognormal with the requested mean and coefficient of variation
    sigma2 = math.log1p(cfg.length_cv**2)
    x = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)
    low, high = bounds if bounds is not None else (1, None)
    return np.clip(np.rint(x), low, high).astype(np.int64)


def synthetic(cfg: TraceConfig) -> pd.DataFrame:
    """Sampled lengths, no content (materialize gives every prompt its own random tokens)."""
    n = cfg.num_requests or DEFAULT_NUM_REQUESTS
    rng = rng_for(cfg.seed, LENGTH_STREAM)
    return pd.DataFrame({"request_id": [str(i) for i in range(n)],
                         "prompt_len": sample_lengths(cfg, "prompt", n, rng),
                         "output_len": sample_lengths(cfg, "output", n, rng)})


def _hash_block_size(prefix_len: int) -> int:
    # a system prompt must end on a block boundary so what follows it can differ
    return math.gcd(prefix_len, MAX_HASH_BLOCK) if prefix_len else MAX_HASH_BLOCK


def shared_prefix(cfg: TraceConfig) -> pd.DataFrame:
    """Each request = one of `num_prefixes` system prompts (chosen uniformly at random) of
    `prefix_len` tokens + its own text of a sampled length."""
    n = cfg.num_requests or DEFAULT_NUM_REQUESTS
    hbs = _hash_block_size(cfg.prefix_len)
    blocks_per_prefix = cfg.prefix_len // hbs
    lengths = rng_for(cfg.seed, LENGTH_STREAM)
    user_lens = sample_lengths(cfg, "prompt", n, lengths)
    output_lens = sample_lengths(cfg, "output", n, lengths)
    groups = rng_for(cfg.seed, GROUP_STREAM).integers(0, cfg.num_prefixes, n)
    next_id = cfg.num_prefixes * blocks_per_prefix   # ids below belong to system prompts
    hash_ids = []
    for group, user_len in zip(groups.tolist(), user_lens.tolist()):
        num_own = -(-user_len // hbs)
        start = group * blocks_per_prefix
        hash_ids.append(list(range(start, start + blocks_per_prefix))
                        + list(range(next_id, next_id + num_own)))
        next_id += num_own
    df = pd.DataFrame({"request_id": [f"prefix{g}-req{i}" for i, g in enumerate(groups.tolist())],
                       "prompt_len": cfg.prefix_len + user_lens,
                       "output_len": output_lens,
                       "hash_ids": hash_ids})
    df.attrs["hash_block_size"] = hbs
    return df


def multi_turn(cfg: TraceConfig) -> pd.DataFrame:
    """Conversations of `num_turns` turns. Prompt of turn k+1 = prompt of turn k + output of
    turn k + new user text. Rows go turn by turn across all conversations (every first turn,
    then every second turn, ...), so a conversation's next turn arrives about
    `number of conversations` requests later: that is its think time."""
    n = cfg.num_requests or DEFAULT_NUM_REQUESTS
    num_convs = -(-n // cfg.num_turns)
    hbs = _hash_block_size(cfg.prefix_len)
    blocks_per_prefix = cfg.prefix_len // hbs
    lengths = rng_for(cfg.seed, LENGTH_STREAM)
    shape = (num_convs, cfg.num_turns)
    user_lens = sample_lengths(cfg, "prompt", num_convs * cfg.num_turns, lengths).reshape(shape)
    output_lens = sample_lengths(cfg, "output", num_convs * cfg.num_turns, lengths).reshape(shape)
    groups = rng_for(cfg.seed, GROUP_STREAM).integers(0, cfg.num_prefixes, num_convs)
    # prompt_lens[c, k] = prefix + sum of user text up to turn k + outputs before turn k
    prompt_lens = cfg.prefix_len + np.cumsum(user_lens, axis=1) + np.cumsum(output_lens, axis=1) \
        - output_lens
    next_id = cfg.num_prefixes * blocks_per_prefix
    chains = []   # one chain of hash ids per conversation, long enough for its last prompt
    for c in range(num_convs):
        num_own = -(-(int(prompt_lens[c, -1]) - cfg.prefix_len) // hbs)
        start = int(groups[c]) * blocks_per_prefix
        chains.append(list(range(start, start + blocks_per_prefix))
                      + list(range(next_id, next_id + num_own)))
        next_id += num_own
    rows = [(f"conv{c}-turn{k}", int(prompt_lens[c, k]), int(output_lens[c, k]),
             chains[c][:-(-int(prompt_lens[c, k]) // hbs)])
            for k in range(cfg.num_turns) for c in range(num_convs)][:n]
    df = pd.DataFrame(rows, columns=["request_id", "prompt_len", "output_len", "hash_ids"])
    df.attrs["hash_block_size"] = hbs
    return df


GENERATORS = {"synthetic": synthetic, "shared_prefix": shared_prefix, "multi_turn": multi_turn}
