"""Which steps the engine replays from a CUDA graph, and how far it pads them: one rule,
torch-free, imported by the engine (what to capture, what to replay) and by the simulator
(what a step costs: a padded step computes its padding rows too, and pays no launch cost).

Two graph families, both keyed by a padded size from one list:
  decode graphs  every sequence computes one token: padded to `size` sequences (= tokens);
  mixed graphs   anything else (prefill chunks, prompts, prefill + decodes): padded to
                 `size` tokens, with room for min(size, max_num_seqs) sequences.
A step larger than the largest size runs eagerly, unpadded.

The sizes: 1, 2, 4, 8, then eight per octave (every 16 from 16 to 128, every 32 to 256,
every 64 to 512, ..., every 1024 to 8192, ...) up to the limit, plus the limit itself (and
max_num_seqs for decode). A step is padded by at most 12.5% (at most 15 tokens below 128,
where steps are bound by weight reads and padding is nearly free).
"""
from bisect import bisect_left


def capture_sizes(limit: int) -> list[int]:
    """Every padded size up to `limit` (inclusive; `limit` itself is always one)."""
    if limit < 1:
        return []
    sizes = [s for s in (1, 2, 4, 8) if s < limit]
    octave = 16
    while octave < limit:
        step = max(16, octave // 8)
        sizes += range(octave, min(2 * octave, limit), step)
        octave *= 2
    return sorted(set(sizes) | {limit})


def decode_sizes(max_num_seqs: int, max_tokens: int) -> list[int]:
    """Decode batch sizes with a graph: the capture sizes up to min(max_num_seqs, max_tokens)."""
    return capture_sizes(min(max_num_seqs, max_tokens))


def mixed_sizes(max_num_batched_tokens: int, max_tokens: int) -> list[int]:
    """Token counts with a mixed-step graph (a mixed step has at least 2 tokens)."""
    return [s for s in capture_sizes(min(max_num_batched_tokens, max_tokens)) if s >= 2]


def padded_size(n: int, sizes: list[int]) -> int:
    """The smallest size >= n, or 0 when n exceeds them all (the step runs eagerly)."""
    i = bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else 0


def graph_rows(num_tokens: int, num_seqs: int, decode_only: bool,
               decode: list[int], mixed: list[int]) -> tuple[str, int]:
    """("decode" | "mixed" | "eager", padded tokens) for a step of `num_tokens` tokens over
    `num_seqs` sequences. A decode-only step that exceeds the decode graphs may still fit a
    mixed graph; the padded token count is what the step computes."""
    if decode_only:
        size = padded_size(num_seqs, decode)
        if size:
            return "decode", size
    size = padded_size(num_tokens, mixed)
    if size:
        return "mixed", size
    return "eager", num_tokens
