"""Turn the canonical table into requests with concrete prompt token ids.

Token content is a pure function of (seed, what the row says about content), so the engine
and the simulator, given the same table and seed, hash identical KV blocks:

- `prompt_token_ids`: kept as they are (checked against `vocab_size`).
- `hash_ids`: token j of hash block h is mix(seed, h, j) % vocab_size. A block's tokens
  depend on its id alone, never on its position, the row or the KV `block_size`, so equal
  ids give equal tokens; a last partial block is the first tokens of its full block.
- neither: random tokens keyed on (seed, request_id), so each prompt is its own.

The hash is splitmix64, a counter-based generator: one vectorized numpy pass per prompt
instead of one seeded RNG per block. Prompts are int64 `array("q")` buffers, copied as
they are into each `Sequence` and hashed in place by the prefix cache: no Python int is
made per token on the way.
"""
import hashlib
from array import array
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from traces.config import TraceError

DEFAULT_HASH_BLOCK_SIZE = 512   # Mooncake's block; a table sets its own in attrs
GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True, slots=True)
class Request:
    """One request to replay: its prompt tokens (an int64 `array("q")`), arrival and how
    many tokens to generate."""
    request_id: str
    arrival_s: float
    prompt_token_ids: array = field(repr=False)
    output_len: int


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(seed: int, label: str) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}:{label}".encode(), digest_size=8)
    return np.uint64(int.from_bytes(digest.digest(), "little"))


def hash_block_tokens(hash_ids, num_tokens: int, hash_block_size: int, vocab_size: int,
                      seed: int) -> np.ndarray:
    """The first `num_tokens` tokens of the blocks `hash_ids` (uint64 array)."""
    pos = np.arange(num_tokens, dtype=np.uint64)
    ids = np.asarray(hash_ids, dtype=np.int64).astype(np.uint64)
    block_keys = _mix(ids * np.uint64(GOLDEN) ^ _key(seed, "hash_ids"))
    keys = block_keys[pos // np.uint64(hash_block_size)]
    return _mix(keys + pos % np.uint64(hash_block_size)) % np.uint64(vocab_size)


def random_tokens(request_id: str, num_tokens: int, vocab_size: int, seed: int) -> np.ndarray:
    pos = np.arange(num_tokens, dtype=np.uint64)
    return _mix(_key(seed, "request:" + request_id) + pos * np.uint64(GOLDEN)) \
        % np.uint64(vocab_size)


def int64_buffer(tokens: np.ndarray) -> array:
    """Token ids as an int64 `array("q")`, copied from a numpy array in one memcpy."""
    buffer = array("q")
    buffer.frombytes(memoryview(np.ascontiguousarray(tokens, dtype=np.int64)).cast("B"))
    return buffer


def materialize(df: pd.DataFrame, block_size: int, vocab_size: int, seed: int) -> list[Request]:
    """One `Request` per row of the canonical table, in row order.

    Token ids are deterministic in (row, seed) and below `vocab_size`. `block_size` (the KV
    cache's) is checked but does not change content: hash blocks are expanded per token, so
    equal hash ids give equal tokens at any block size. Hash ids cover
    `df.attrs["hash_block_size"]` tokens each (512 if unset).
    Raises TraceError for a given token id >= vocab_size or content that does not match
    prompt_len, naming the file and line (a table from `load_trace` keeps both: the
    `line` column and `df.attrs["source"]`), else the row and request."""
    if not (isinstance(block_size, int) and block_size >= 1):
        raise TraceError(f"block_size must be a positive integer, got {block_size!r}")
    if not (isinstance(vocab_size, int) and vocab_size >= 2):
        raise TraceError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    if not (isinstance(seed, int) and seed >= 0):
        raise TraceError(f"seed must be an integer >= 0, got {seed!r}")
    missing = [c for c in ("request_id", "arrival_s", "prompt_len", "output_len")
               if c not in df.columns]
    if missing:
        raise TraceError(f"trace table is missing column(s) {missing}")
    hbs = int(df.attrs.get("hash_block_size", DEFAULT_HASH_BLOCK_SIZE))
    given = df["prompt_token_ids"] if "prompt_token_ids" in df.columns else None
    hashed = df["hash_ids"] if "hash_ids" in df.columns else None
    source = df.attrs.get("source")
    lines = df["line"].tolist() if source and "line" in df.columns else None
    requests = []
    rows = zip(df["request_id"].tolist(), df["arrival_s"].tolist(),
               df["prompt_len"].tolist(), df["output_len"].tolist())
    for i, (request_id, arrival_s, prompt_len, output_len) in enumerate(rows):
        where = (f"{source}, line {lines[i]}" if lines is not None
                 else f"row {i} (request_id {request_id!r})")
        if prompt_len < 1 or output_len < 1:
            raise TraceError(f"{where}: prompt_len and output_len must be >= 1, got "
                             f"{prompt_len} and {output_len}")
        if given is not None and given.iloc[i] is not None:
            tokens = np.asarray(given.iloc[i], dtype=np.int64)
            if len(tokens) != prompt_len:
                raise TraceError(f"{where}: {len(tokens)} prompt_token_ids but prompt_len "
                                 f"{prompt_len}")
            if len(tokens) and (tokens.max() >= vocab_size or tokens.min() < 0):
                raise TraceError(f"{where}: token id {int(tokens.max())} is outside the "
                                 f"model's vocabulary [0, {vocab_size}): the ids come from "
                                 "another tokenizer (pick a model with that vocabulary)")
        elif hashed is not None and hashed.iloc[i] is not None:
            ids = hashed.iloc[i]
            if len(ids) != -(-prompt_len // hbs):
                raise TraceError(f"{where}: {len(ids)} hash_ids but prompt_len {prompt_len} "
                                 f"needs ceil({prompt_len}/{hbs}) = {-(-prompt_len // hbs)} "
                                 "(hash_block_size from df.attrs)")
            tokens = hash_block_tokens(ids, prompt_len, hbs, vocab_size, seed)
        else:
            tokens = random_tokens(str(request_id), prompt_len, vocab_size, seed)
        requests.append(Request(str(request_id), float(arrival_s), int64_buffer(tokens),
                                int(output_len)))
    return requests
