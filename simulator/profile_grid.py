"""What a calibration profiles: the grid of step shapes, and a shape made into a policy Batch.

A shape is a list of entries (context after the step, new tokens) or (context, new tokens,
shared tokens, group): n == 1 entries are decodes, the others prompt chunks ending at their
context; an entry with a group shares its first `shared tokens` (whole blocks) with the
other entries of its group, the same KV blocks, as prefix-cache hits do. A grid point is
{"shape": [...], "split": "train" | "held_out"} (and "grid": "moe" for a mixture of experts'
extra points); held-out points are never fitted on, and the error a calibration reports per
step kind is theirs, so they sit where serving's steps fall between the fitted ones.

`profile_grid` builds the grid in stages, each a function below that says which steps of
serving its shapes stand for and what was measured when they were missing. Torch-free: the
engine (experiments.calibrate) runs the batches, the tests fit on their simulated costs.
"""
import functools

import numpy as np

from policy import Batch, Sequence
from policy.decode_plan import DecodePlan
from simulator.cost_model import CudaGraphs, step_experts_touched

BASE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)   # batch sizes profiled where there are no graphs


def profile_grid(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 graphs: CudaGraphs) -> list[dict]:
    """The step shapes to profile an engine with these limits and CUDA graphs on, in a fixed
    order (a calibration's profile is matched to its grid by position): decode batches at
    every graph size (`decode_batches`, `padded_decodes`, `serving_decodes`,
    `prompted_decodes`, `reread_twins`), prompt chunks at every mixed-graph size alone, behind
    cached context and beside decodes (`prompt_bursts`, `chunks`), and eager steps beyond the
    graphs up to the token budget (`eager_steps`; with graphs up to the budget none run)."""
    g = _Grid(max_num_seqs, max_num_batched_tokens, max_model_len, graphs)
    for stage in (decode_batches, padded_decodes, serving_decodes, prompted_decodes, reread_twins,
                  prompt_bursts, chunks, eager_steps):
        stage(g)
    return g.points


class _Grid:
    """The grid being built and the sizes its stages share."""

    def __init__(self, S: int, M: int, L: int, graphs: CudaGraphs):
        self.S, self.M, self.L, self.graphs = S, M, L, graphs
        self.points: list[dict] = []
        self.contexts = sorted({max(2, min(L, c)) for c in (32, 256, 1024, 4096)})   # decode KV
        half = len(self.contexts) // 2
        self.mid, self.top = self.contexts[half], self.contexts[-1]
        self.held_ctx = int((self.contexts[half - 1] * self.mid) ** 0.5)   # between two fitted
        self.decode = list(graphs.decode) or sorted({b for b in BASE_SIZES if b <= S} | {S})
        if graphs.decode and S > graphs.decode[-1]:
            self.decode += [S]                                  # past the graphs: eager decode
        # serving's batch sizes: every graph size and the middle of each gap (run padded)
        self.batches = sorted(set(self.decode[1:]) | {(a + b) // 2 for a, b in zip(self.decode, self.decode[1:])
                                                      if b - a > 1})
        self.prefix = min(512, self.top // 8)     # a system prompt every decode holds
        self.cached = max(0, min(L - 1, 1024))    # cached context behind a chunk

    def add(self, shape: list[tuple], split: str = "train") -> None:
        self.points.append({"shape": shape, "split": split})

    def spread(self, b: int, c: int) -> list[tuple]:
        """b decodes whose contexts run evenly from c/4 to 7c/4 (mean c)."""
        return [(max(2, min(self.L, int(c * (0.25 + 1.5 * i / (b - 1))))), 1) for i in range(b)]

    def serving(self, b: int, mean: int) -> list[tuple]:
        return serving(b, mean, self.L)

    def prompted(self, entries: list[tuple]) -> list[tuple]:
        """Every sequence holds the system prompt and something of its own."""
        return [(min(self.L, max(ctx, self.prefix + 64)), n) for ctx, n in entries]


def shared(entries: list[tuple], tokens: int, groups: int = 1) -> list[tuple]:
    """The entries sharing their first `tokens` tokens, in `groups` groups (round robin)."""
    return [(ctx, n, tokens, i % groups) for i, (ctx, n) in enumerate(entries)]


def serving(b: int, mean: int, max_len: int) -> list[tuple]:
    """b decodes whose contexts are drawn as a serving batch's are (ShareGPT on Qwen3-0.6B,
    8-32 req/s: within a step, context / the step's mean had quantiles 0.1 / 0.4 / 0.85 /
    1.45 / 2.1 / 2.4 at 5 / 25 / 50 / 75 / 90 / 95%, a coefficient of variation of 0.7):
    Gamma(2) around `mean`, in [2, max_len], fixed by (b, mean)."""
    rng = np.random.default_rng(b * 100_003 + mean)
    return [(int(min(max_len, max(2, x))), 1) for x in rng.gamma(2.0, mean / 2.0, b)]


# ---- decode steps --------------------------------------------------------------------------
def decode_batches(g: _Grid) -> None:
    """Every decode batch size x KV context: all of one context (lockstep), and spread evenly
    around it; one long sequence among short ones (its attention sets the tail); sharing a
    prefix of 1/2 or 7/8 of their context (prefix-cache hits: a shared block is read once per
    sequence, the reads after the first mostly from L2), in one group or four. Held out: a
    context between two fitted ones, uniform, spread and 3/4 shared."""
    for b in g.decode:
        for c in g.contexts:
            g.add([(c, 1)] * b)
            if b > 1 and c != g.contexts[0]:
                g.add(g.spread(b, c))
        if b > 1:
            g.add([(min(g.L, 8 * g.contexts[1]), 1)] + [(g.contexts[1] // 2, 1)] * (b - 1))
        g.add([(g.held_ctx, 1)] * b, "held_out")
        if b > 1:
            g.add(g.spread(b, g.held_ctx), "held_out")
            for c in g.contexts[1:]:
                for frac in (0.5, 0.875):
                    g.add(shared([(c, 1)] * b, int(c * frac)))
            g.add(shared(g.spread(b, g.mid), g.mid // 4))
            if b >= 8:
                g.add(shared([(g.top, 1)] * b, g.top * 7 // 8, groups=4))
            g.add(shared([(g.held_ctx, 1)] * b, g.held_ctx * 3 // 4), "held_out")


def padded_decodes(g: _Grid) -> None:
    """Decode batches across each graph bucket, run padded to its graph size: serving fills a
    bucket at every size, most of its decode steps run padded, and the split-KV plan plans the
    padding rows. Per bucket (below, b] of graph sizes from 8 rows up: one past `below` spread
    around the middle context, and at one past `below`, a quarter and three quarters into the
    bucket (its middle is one of `serving_decodes`' sizes) batches as serving forms them at means
    of 1/4, 1/2 and 3/4 of the longest context (3/8 held out). Measured on the H200
    (Qwen3-0.6B, session 18): serving's 32-row decode steps were mostly 17-23 decodes (2,118 of
    2,759 with 9+ padding rows), a grid with padded batches only one past each graph size and
    at 1k tokens priced those above 32k tokens of KV 2.5-3.5% high, full ones within 2%."""
    for below, b in zip(g.decode, g.decode[1:]):
        if below < 8 or b - below <= 1:
            continue
        g.add(g.spread(below + 1, g.mid))
        g.add(g.spread(below + 1, g.held_ctx), "held_out")
        quarter = (b - below) // 4
        for n in sorted({below + 1, below + quarter, b - quarter} - {below, b, (below + b) // 2}):
            for frac, split in ((1 / 4, "train"), (3 / 8, "held_out"), (1 / 2, "train"), (3 / 4, "train")):
                g.add(g.serving(n, int(g.top * frac)), split)


def serving_decodes(g: _Grid) -> None:
    """Decode batches as serving forms them (contexts of every length around a mean, a long
    tail included: `serving`) at each of serving's batch sizes, at means between the uniform
    contexts; some means held out, so the held-out error measures what serving steps see."""
    for b in g.batches:
        for frac, split in ((1 / 4, "train"), (3 / 8, "held_out"), (1 / 2, "train"),
                            (5 / 8, "held_out"), (3 / 4, "train")):
            g.add(g.serving(b, int(g.top * frac)), split)


def prompted_decodes(g: _Grid) -> None:
    """Serving's decode batches of 2-64 all holding one system prompt (mooncake_conv's 512
    tokens), so that 10-25% of their KV is re-read. The shared shapes of `decode_batches`
    re-read 1/2-7/8 of it (a conversation's history), where a re-read saves less: on the H200
    (Qwen3-0.6B) mooncake_conv's decode steps of 8-16 decodes ran 19-20 ns per re-read token
    faster than unshared steps of their shape; a fit without these shapes said 11 ns."""
    for b in g.batches:
        if 2 <= b <= 64:
            for frac, split in ((1 / 4, "train"), (3 / 8, "held_out"), (1 / 2, "train")):
                g.add(shared(g.prompted(g.serving(b, int(g.top * frac))), g.prefix), split)


def reread_twins(g: _Grid) -> None:
    """The same at serving's longer means, each beside its twin (the same contexts, nothing
    shared), so that a pair's difference measures the re-read's saving alone
    (simulator.calibrate.print_reread_savings): mooncake_conv's steps, a system prompt under
    every decode of 2-4k tokens (10-20% re-read, 4-32 decodes). Measured on the H200
    (Qwen3-0.6B): those steps ran 21 ns per re-read token faster than unshared steps of the same
    features (16-32 decodes); the profile's shapes at 8-64 rows saved 14-20 ns at such shares,
    10-11 ns at 7/8, ~2 ns at 256-token contexts; one fitted coefficient, 11 ns, priced them
    3-4% high. Pairs are held out together; only where the profiled contexts reach 2k (below,
    the shapes above cover serving's)."""
    for k, b in enumerate(b for b in g.batches if 2 <= b <= 64 and g.top >= 2048):
        for j, frac in enumerate((5 / 8, 3 / 4, 7 / 8)):
            entries = g.prompted(g.serving(b, int(g.top * frac)))
            split = "held_out" if (k + j) % 3 == 1 else "train"
            g.add(entries, split)
            g.add(shared(entries, g.prefix), split)


# ---- prompt chunks ---------------------------------------------------------------------------
def prompt_bursts(g: _Grid) -> None:
    """Several prompts in one step, each behind cached context, beside 8 of serving's decodes: a
    burst of conversation turns, at every mixed-graph size of 1,024 tokens or more.
    mooncake_conv's steps of 2-5 prompts filling the budget behind 0.5-2k cached tokens each
    ran 4-10% over a fit that had several chunks per step only without cached context. Two
    chunks behind 1k tokens beside the decodes and alone (Llama-3.1-8B's two chunks of 2,040
    behind 1,024 each beside 8 decodes ran 13.9 ms over two fresh ones: the chunks or the
    decodes beside them?), three behind a shared system prompt, and four or six behind 1k or 2k
    tokens each (Llama-3.1-8B's real steps of four or more chunks behind over 512 cached tokens
    each ran 17-22% under a price extrapolated past three chunks, session 12)."""
    cached, few = g.cached, min(8, g.S - 2)
    for k, t in enumerate(t for t in g.graphs.mixed if t >= 1024 and t // 2 + cached <= g.L):
        beside = g.serving(few, g.top // 2)
        half = (t - few) // 2
        g.add([(cached + half, half), (cached + t - few - half, t - few - half)] + beside,
              "held_out" if k % 2 else "train")
        g.add([(cached + t // 2, t // 2), (cached + t - t // 2, t - t // 2)], "train" if k % 2 else "held_out")
        third = (t - few) // 3
        g.add(shared([(g.prefix + third, third)] * 2 + [(g.prefix + t - few - 2 * third, t - few - 2 * third)],
                     g.prefix) + shared(g.prompted(beside), g.prefix), "train" if k % 2 else "held_out")
        for j, (many, behind) in enumerate(((4, cached), (6, 2 * cached))):
            each = (t - few) // many
            if each >= 16 and behind + each <= g.L:
                last = t - few - (many - 1) * each
                g.add([(behind + each, each)] * (many - 1) + [(behind + last, last)] + beside,
                      "held_out" if (k + j) % 2 else "train")


def chunks(g: _Grid) -> None:
    """At every mixed-graph size t, a prompt chunk of t tokens (or t less its decodes' rows):
    - alone, without and behind cached context: 1k (512 held out), 4k, 6k tokens. Serving
      chunks sit behind 2-8k tokens (a conversation's history, a long prompt's earlier
      chunks); with at most 1k profiled, a fit extrapolated their attention and priced
      Qwen3-0.6B's mooncake_conv chunks of 256-2048 tokens behind 2-8k 8-16% high (H200);
    - beside up to 16 decodes at the middle and the longest context, sharing a prefix or not,
      and beside t/2 decodes spread at two means (steps at load: a chunk beside 64-256
      decodes of thousands of tokens);
    - behind 2k or 4k cached tokens beside 1, 8 or 32 of serving's decodes: a conversation
      turn at load (Llama-3.1-8B's real steps of one chunk behind 0.5-5k cached tokens
      beside 2-40 decodes ran 8-16% over a fit that priced the lone chunks within 2-7%);
    - as two and four prompts: the same tokens with a half or a quarter of one chunk's
      query-key pairs (with one chunk per step its pairs grow with its tokens and cannot be
      told from them);
    - beside up to 64 of serving's decodes, and beside 1, 3 or 8 of them, as a prompt step
      below capacity mostly is (Qwen3-0.6B on the H200: a chunk beside 1-8 decodes ran 2-8%
      over a fit whose chunks had 0, 16 or t/2 decodes beside them, those beside 16-32
      within 1%).
    Held out: alternate sizes' variants, and spread / shared decodes at the held-out context."""
    cached, mid, longest = g.cached, g.mid, g.top
    for i, t in enumerate(g.graphs.mixed):
        g.add([(t, t)])
        if cached and t + cached <= g.L:
            g.add([(cached + t, t)])
        d = min(t // 2, g.S - 1, 16)
        if d:
            g.add([(t - d, t - d)] + [(mid, 1)] * d)
            g.add([(t - d, t - d)] + [(longest, 1)] * d)
        if d > 1:
            g.add([(t - d, t - d)] + shared([(longest, 1)] * d, longest * 7 // 8))
        many = min(t // 2, g.S - 1)
        if many > max(d, 1):
            g.add([(t - many, t - many)] + g.spread(many, mid))
            g.add([(t - many, t - many)] + g.spread(many, longest // 2))
            g.add([(t - many, t - many)] + shared(g.spread(many, mid), mid // 4))
        if t + cached // 2 <= g.L and t >= 2:
            g.add([(cached // 2 + t, t)], "held_out")
        if cached and t + 4 * cached <= g.L:
            g.add([(4 * cached + t, t)])
        if cached and t + 6 * cached <= g.L:
            g.add([(6 * cached + t, t)], "held_out" if i % 2 else "train")
        behind, beside = (2 * cached, 4 * cached)[i % 2], (1, 8, 32)[i % 3]
        if cached and beside <= t // 2 and beside < g.S and t - beside + behind <= g.L:
            g.add([(behind + t - beside, t - beside)] + g.serving(beside, longest // 2),
                  "held_out" if i % 4 == 3 else "train")
        if d > 1:
            g.add([(t - d, t - d)] + g.spread(d, g.held_ctx), "held_out")
            g.add([(t - d, t - d)] + shared([(g.held_ctx, 1)] * d, g.held_ctx // 2), "held_out")
        if t >= 64 and g.S >= 4:
            g.add([(t // 2, t // 2), (t - t // 2, t - t // 2)])
            g.add([(t // 4, t // 4)] * 3 + [(t - 3 * (t // 4), t - 3 * (t // 4))],
                  "held_out" if len(g.points) % 2 else "train")
        served = min(t // 2, g.S - 1, 64)
        if served > 1:
            g.add([(t - served, t - served)] + g.serving(served, longest // 2),
                  "held_out" if len(g.points) % 2 else "train")
        for k, few in enumerate((1, 3, 8)):
            if few <= t // 2 and few < g.S:
                g.add([(t - few, t - few)] + g.serving(few, longest // 2),
                      "held_out" if (i + k) % 3 == 0 else "train")


def eager_steps(g: _Grid) -> None:
    """Eight token counts past the largest mixed graph up to the token budget, run eagerly (2, 8
    and 32 too where there are no graphs): a chunk alone and behind 1k cached tokens, beside a
    quarter's worth of decodes (up to 32, sharing 7/8 or not) and beside half; and the same
    tokens as several prompts: two halves, and one long prompt ahead of three of a sixteenth
    each (a burst's arrivals behind a long one, as prefill_first forms them): with one prompt
    per step a chunk's query-key pairs grow with its tokens and cannot be told from them (as
    in `chunks`). Engines whose mixed graphs reach the token budget (the shipped calibrations:
    8,192 both) run none of these. Every other size held out, never the largest."""
    limit = g.graphs.mixed[-1] if g.graphs.mixed else 1
    top = min(g.M, g.L)
    eager = sorted({int(x) for x in np.geomspace(max(limit + 1, 2), top, 8)}) if top > limit else []
    if not g.graphs.mixed:
        eager = sorted({2, 8, 32} | set(eager))
    for k, t in enumerate(eager):
        split = "held_out" if k % 2 and k != len(eager) - 1 else "train"
        g.add([(t, t)], split)
        if g.cached and t + g.cached <= g.L:
            g.add([(g.cached + t, t)], split)
        d = min(t // 4, g.S - 1, 32)
        if d:
            g.add([(t - d, t - d)] + [(g.mid, 1)] * d, split)
        if d > 1:
            g.add([(t - d, t - d)] + shared([(g.mid, 1)] * d, g.mid * 7 // 8), split)
        many = min(t // 2, g.S - 1)
        if many > max(d, 1):
            g.add([(t - many, t - many)] + g.spread(many, g.mid), split)
        if t >= 64 and g.S >= 4:
            g.add([(t // 2, t // 2), (t - t // 2, t - t // 2)], split)
            short = t // 16
            g.add([(t - 3 * short, t - 3 * short)] + [(short, short)] * 3, split)


# ---- a mixture of experts' extra points ---------------------------------------------------------
def moe_grid(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
             graphs: CudaGraphs, num_experts: int, top_k: int) -> list[dict]:
    """Extra profile shapes for a mixture of experts ("grid": "moe"): decode batches (context
    ~1024) and prompt chunks whose token counts lie between consecutive CUDA-graph sizes
    (without graphs: between the base grid's batch sizes), up to the first size past the
    point where the expected experts touched reach 99% of all: in each gap the first and
    last count are fitted on, the middle one held out."""
    S, M, L = max_num_seqs, max_num_batched_tokens, max_model_len
    saturated = next((t for t in range(1, M + 1)
                      if step_experts_touched(num_experts, top_k, t, t) >= 0.99 * num_experts), M)
    ctx = max(2, min(L, 1024))
    decode = list(graphs.decode) or sorted({b for b in BASE_SIZES if b <= S} | {S})
    mixed = list(graphs.mixed) or sorted({t for t in BASE_SIZES if t <= min(M, L)})
    grid = []

    def between(sizes: list[int], make) -> None:
        for a, b in zip(sizes, sizes[1:]):
            inner = list(range(a + 1, b))
            if not inner or a > saturated:
                continue
            held = inner[len(inner) // 2] if len(inner) >= 2 else None
            for n in sorted({inner[0], inner[-1]} - {held}):
                grid.append({"shape": make(n), "split": "train", "grid": "moe"})
            if held is not None:
                grid.append({"shape": make(held), "split": "held_out", "grid": "moe"})
    between(decode, lambda b: [(ctx, 1)] * b)
    between(mixed, lambda t: [(t, t)])
    return grid


# ---- a shape as a Batch ------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def scattered_blocks(seed: int, num_blocks: int) -> np.ndarray:
    """Blocks 1 .. num_blocks - 1 in a fixed random order (`seed`)."""
    return np.random.default_rng(seed).permutation(max(1, num_blocks - 1)) + 1


def is_decode_entry(ctx: int, n: int) -> bool:
    """Whether a shape entry (context after the step, new tokens) is a decode (its prompt ended
    earlier) rather than a prompt chunk: shape_batch's rule, which the profile's columns follow."""
    return n == 1 and ctx > 1


def shape_batch(shape: list[tuple], block_size: int, num_blocks: int,
                decode_plan: DecodePlan | None = None, contiguous: bool = False) -> Batch:
    """A policy Batch for a profiled shape: one all-zero sequence per (context after the
    step, new tokens[, shared tokens, group]) (`random_token_ids` draws others); n == 1
    entries are decodes (their prompt ended earlier), the others prompt chunks ending at
    their context. Block tables take blocks scattered over a pool of `num_blocks` (a fixed
    random permutation, wrapping around when the shape needs more), as a serving engine's
    tables are after some churn: the KV read is junk, its cost (locality included) is real.
    An entry with a group starts its table with the group's blocks, the same block ids, for
    its first `shared tokens` // block_size blocks (a prefix-cache hit; never the block its
    step writes), the rest its own. Block 0, the engine's dummy block, is never used.
    `decode_plan`: the engine's (its features then have decode_span_tokens). `contiguous`:
    blocks 1, 2, 3, ... in order instead, as a fresh pool hands them out
    (benchmarks/probe_transitions.py times both layouts)."""
    batch = Batch(block_size=block_size, decode_plan=decode_plan)
    pool = np.arange(1, max(2, num_blocks)) if contiguous else scattered_blocks(len(shape), num_blocks)
    next_block = 0
    def take(k):
        nonlocal next_block
        next_block += k
        return pool[np.arange(next_block - k, next_block) % len(pool)].tolist()
    prefixes: dict[int, list] = {}       # group -> its shared blocks
    for i, (ctx, n, *share) in enumerate(shape):
        seq = Sequence(i, bytes(8 * ctx), 1)      # ctx zero token ids (int64), one memcpy
        decode = is_decode_entry(ctx, n)
        if decode:
            seq.num_prompt_tokens = ctx - 1
        blocks = -(-ctx // block_size)
        common = 0
        if share:
            tokens, group = share
            common = min(tokens, ctx - n) // block_size    # whole blocks its step does not write
            prefix = prefixes.setdefault(group, [])
            if len(prefix) < common:
                prefix += take(common - len(prefix))
        seq.block_table = (prefixes[share[1]][:common] if common else []) + take(blocks - common)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.num_computed_tokens.append(ctx - n)
        batch.sample.append(True)
        batch.num_batched_tokens += n
        batch.num_decode_seqs += decode
        batch.num_prefill_tokens += 0 if decode else n
    return batch


def random_token_ids(batch: Batch, vocab_size: int, seed: int) -> None:
    """Give every sequence of a profiled batch random token ids in [1, vocab) (fixed by
    `seed`), in place: a mixture of experts' rows then route as a serving batch's do, and a
    dense model's matmuls see varied rows as serving's do (all-zero ids give identical rows;
    operands that vary less draw less power, and a GPU near its power limit may then clock
    higher than it does in serving)."""
    rng = np.random.default_rng(seed)
    for seq in batch.seqs:
        seq.token_ids = type(seq.token_ids)("q", rng.integers(1, vocab_size, seq.num_tokens,
                                                              dtype=np.int64).tobytes())
