"""The split-KV plan of the engine's decode attention, as host rules without torch: the engine
launches its decode kernel with it (engine.kernels.launch.plan_decode_work), and a step's
record prices it (`DecodePlan.step_features`: the `decode_span_tokens` and
`decode_split_seqs` features the fitted cost model reads), so both executors cost a step by
the same plan.

The plan: the batch's total context is cut into about `target` = PROGRAMS_PER_SM x SMs /
KV heads items (shares of whole DECODE_BLOCK_N-token tiles, each sequence's shares as even as
its tiles allow); the kernel runs one program per (item, KV head). The decode attention's
time follows the plan's longest chain of work, not only its summed context: a batch whose
shares round up to more items than `target` runs a second wave, and sequences of unequal
length leave unequal shares (measured on an H200, Qwen3-0.6B: real serving batches, whose
contexts differ, ran 4-6% over a model fitted on uniform-context batches; with the span
the fit's held-out error fell from 2.3% to 1.6% on decode steps and from 3.4% to 1.5-2%
on mixed ones). `DecodePlan.split_seqs` counts the decodes the plan splits (the
`decode_split_seqs` feature): each split sequence's partial outputs are written in fp32 and
combined by the merge kernel, whose programs for the other sequences return at once.
`decode_work_items` counts the plan's items (the programs per KV head): each carries fixed
work whatever its share (its query, its partial output and log-sum-exp, its merge ticket),
so the attention's cost rises steeply while a growing batch context adds items and then
grows at the KV's bandwidth once the items reach `target` (measured on the H200,
Qwen3-0.6B: without the count, decode steps of 3-32 decodes with 1-4k tokens each, serving's
usual step, were priced 2-6% low, on the profile's own shapes and on real runs alike).
"""
from dataclasses import dataclass
from heapq import heapreplace

import numpy as np

from policy.cuda_graphs import padded_size

DECODE_BLOCK_N = 64          # KV tokens per tile of the decode kernel
PROGRAMS_PER_SM = 4          # the plan aims at about this many programs per SM in flight
# ... but never a share below this much KV. 64 since session 24 (was 128; H200, Qwen3-0.6B:
# batch 1 at context 1k -4.5%, batches 16 / 64 / mixed unchanged). Each calibration records
# the rule of the engine it profiled, and pinning it as EngineConfig.kernel_plan runs that rule.
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 64              # ... nor more shares of one sequence than this
SPLIT_SLACK = 1.25           # a sequence up to 1.25 shares long stays one share (no merge)
# A program's fixed work (its query, its partial output, the merge of a split sequence)
# in tiles of KV: what `span_tokens` adds per item. Chosen on the H200 profile's held-out
# shapes: 0, 1, 2 or 4 tiles gave decode 1.73 / 1.62 / 1.55 / 1.62% and mixed 3.22 / 2.11 /
# 1.54 / 2.02% held-out error.
PROGRAM_OVERHEAD_TILES = 2
# The fields of a `DecodePlan` that state its rule (a calibration records them: the rule of
# the engine it profiled, which may since have changed).
RULE_FIELDS = ("block_n", "programs_per_sm", "min_tokens_per_split", "max_splits", "split_slack",
               "overhead_tiles")
# The fields the kernel runs (`overhead_tiles` is the cost model's): what a kernel plan pins.
KERNEL_RULE_FIELDS = RULE_FIELDS[:-1]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """How the engine plans one rank's decode attention: its KV heads, the GPU's SMs, its
    decode CUDA-graph sizes (a decode-only step replayed from a graph of `size` rows plans
    its padding rows too, each a one-token context: policy.cuda_graphs), and the rule's
    constants (RULE_FIELDS; the module's, i.e. the engine's, unless given: a calibration
    keeps those of the engine it profiled). `overhead_tiles` is the span's, not the kernel's:
    a program's fixed work in tiles of KV."""
    num_kv_heads: int
    num_sms: int
    decode_graph_sizes: tuple = ()
    block_n: int = DECODE_BLOCK_N
    programs_per_sm: int = PROGRAMS_PER_SM
    min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT
    max_splits: int = MAX_SPLITS
    split_slack: float = SPLIT_SLACK
    overhead_tiles: int = PROGRAM_OVERHEAD_TILES

    def __post_init__(self):
        for name in ("num_kv_heads", "num_sms", "block_n", "programs_per_sm", "min_tokens_per_split", "max_splits"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"decode plan: {name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.split_slack, (int, float)) and self.split_slack >= 1):
            raise ValueError(f"decode plan: split_slack must be >= 1, got {self.split_slack!r}")
        if not (isinstance(self.overhead_tiles, int) and self.overhead_tiles >= 0):
            raise ValueError(f"decode plan: overhead_tiles must be an integer >= 0, got {self.overhead_tiles!r}")

    @property
    def target(self) -> int:
        """Items the plan aims at: about programs_per_sm programs per SM, one per (item, KV head)."""
        return cdiv(self.programs_per_sm * self.num_sms, self.num_kv_heads)

    def kernel_rule(self) -> dict:
        """The rule the kernel runs ({field: value} over KERNEL_RULE_FIELDS): what
        engine.kernel_plan writes and pins."""
        return {name: getattr(self, name) for name in KERNEL_RULE_FIELDS}

    def describe(self) -> dict:
        """What a calibration records: the geometry and the rule (not the graph sizes, which
        the simulated run's engine settings give)."""
        return {"num_kv_heads": self.num_kv_heads, "num_sms": self.num_sms,
                **{name: getattr(self, name) for name in RULE_FIELDS}}

    def shares(self, context_lens):
        """The plan's shares: (ctx, tiles, per, shares), int64 arrays over the sequences.
        Sequence b (context ctx[b] >= 1, clamped) is cut into shares[b] shares of per[b]
        tiles (the last takes the rest, tiles[b] - per[b] (shares[b] - 1)). A share holds
        about `chunk` tokens: the total context over `target` items, but at least
        min_tokens_per_split and at most max_splits shares per sequence, and a share may
        reach split_slack x chunk; a sequence's shares split its tiles evenly (2100 tokens at
        chunk 1024: two shares of 17 and 16 tiles, not 16 and 17 and a 52-token third)."""
        ctx = np.maximum(np.asarray(context_lens, dtype=np.int64), 1)
        chunk = max(self.min_tokens_per_split, cdiv(int(ctx.sum()), self.target),
                    cdiv(int(ctx.max()), self.max_splits))
        tiles = (ctx + self.block_n - 1) // self.block_n
        # A sequence at most split_slack chunks long stays whole: at batch 64 and context ~1k
        # every sequence was just over the chunk, and splitting them all in two cost a merge
        # kernel (~6 us a layer on the H200) to shorten programs already about the balanced length.
        wanted = np.maximum(1, np.ceil(ctx / (chunk * self.split_slack)).astype(np.int64))
        per = (tiles + wanted - 1) // wanted        # tiles per share
        shares = (tiles + per - 1) // per           # <= wanted: no share is empty
        return ctx, tiles, per, shares

    def planned_lens(self, context_lens, decode_only: bool) -> list[int]:
        """The contexts the engine plans for a step's decodes (`context_lens`, in batch order,
        KV length after the step): a decode-only step that replays a decode CUDA graph of
        more rows adds its padding rows, one-token contexts the engine plans too
        (engine.step_inputs); a step with a prefill chunk plans its decodes only."""
        n = len(context_lens)
        if n and decode_only and self.decode_graph_sizes:
            rows = padded_size(n, self.decode_graph_sizes)
            if rows > n:
                return list(context_lens) + [1] * (rows - n)
        return list(context_lens)

    def span_tokens(self, context_lens: list[int], decode_only: bool) -> int:
        """The decode attention's longest chain of work, in KV tokens: the plan's items
        (each its tiles + overhead_tiles) dealt in launch order to `target` slots (the items
        in flight at once: programs_per_sm x SMs / KV heads), each item to the slot that
        frees first; the busiest slot's tiles x block_n. Within `target` items that is the
        largest share; past it, the items beyond run in a second wave behind the first ones
        to finish. `context_lens`: the step's decodes in batch order (KV length after the
        step); `decode_only`: the step has no prefill chunk (so it may replay a padded
        decode graph: `planned_lens`). 0 without decodes."""
        return self.step_features(context_lens, decode_only)["decode_span_tokens"]

    def split_seqs(self, context_lens: list[int], decode_only: bool) -> int:
        """Decode sequences the plan cuts into more than one share: the sequences whose
        partial outputs the merge kernel combines (its other programs return at once). A
        padding row (one token) is never split, but it counts in the total context that
        sets the share size. Same arguments as `span_tokens`."""
        return self.step_features(context_lens, decode_only)["decode_split_seqs"]

    def step_features(self, context_lens: list[int], decode_only: bool) -> dict:
        """The step features of the plan, from one `shares` call: {"decode_span_tokens":
        `span_tokens`, "decode_split_seqs": `split_seqs`, "decode_work_items": the plan's
        items, padding rows included (each one program per KV head)} (all 0 without decodes)."""
        if not context_lens:
            return {"decode_span_tokens": 0, "decode_split_seqs": 0, "decode_work_items": 0}
        _, tiles, per, shares = self.shares(self.planned_lens(context_lens, decode_only))
        return {"decode_span_tokens": self._span(tiles, per, shares),
                "decode_split_seqs": int(np.count_nonzero(shares > 1)),
                "decode_work_items": int(shares.sum())}

    def _span(self, tiles, per, shares) -> int:
        slots, extra = self.target, self.overhead_tiles
        if int(shares.sum()) <= slots:   # one wave: the largest share (a sequence's first)
            return (int(per.max()) + extra) * self.block_n
        cost = np.repeat(per + extra, shares)
        cost[np.cumsum(shares) - 1] = tiles - per * (shares - 1) + extra
        busy = sorted(cost[:slots].tolist())     # a sorted list is a heap
        for c in cost[slots:].tolist():
            heapreplace(busy, busy[0] + c)
        return max(busy) * self.block_n
