"""The step contract between the policy and an executor."""
from dataclasses import dataclass, field

from policy.decode_plan import DecodePlan
from policy.sequence import Sequence


@dataclass(slots=True)
class Batch:
    """What one step computes. Entry i of each list describes `seqs[i]`: it computes
    tokens `[num_computed_tokens[i], num_computed_tokens[i] + num_new_tokens[i])` of
    `seqs[i].token_ids`, over the KV blocks in `seqs[i].block_table` (already allocated for
    them). `sample[i]` says whether the step ends at the sequence's last known token, so a
    new token is sampled from its last position; otherwise it was a prefill chunk.

    The executor returns one token id per sequence (entries where `sample[i]` is False are
    ignored) and passes them to `Scheduler.update`.

    The counters describe the step for the cost model and the step log.
    """
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    num_batched_tokens: int = 0     # sum of num_new_tokens
    num_prefill_tokens: int = 0     # tokens of prompt (or recompute) chunks
    num_decode_seqs: int = 0        # sequences computing one generated token
    num_preempted: int = 0          # sequences preempted while building this step
    prefix_hit_tokens: int = 0      # prompt tokens served from the prefix cache this step
    kv_blocks_used: int = 0         # blocks held after this step's allocation
    block_size: int = 0             # tokens per KV block of the tables (0: not given)
    decode_plan: DecodePlan | None = None   # the engine's split-KV decode plan (None: no
                                            # decode_span_tokens / decode_split_seqs /
                                            # decode_work_items)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def context_lens(self) -> list[int]:
        """KV length each sequence attends over after this step."""
        return [c + n for c, n in zip(self.num_computed_tokens, self.num_new_tokens)]

    def features(self) -> dict:
        """The step's shape: the `steps.parquet` columns a cost model reads. Work features:
        decode_context_tokens (KV read by decodes), prefill_context_tokens (sum over prefill
        chunks of new tokens x context after the chunk), prefill_kv_tokens (sum of context
        after each chunk: KV its attention reads) and prefill_attention_pairs (causal
        query-key pairs, n*start + n(n+1)/2 per chunk) and max_context_tokens (the longest
        context after the step: a decode batch's attention ends with its longest sequence);
        prefill_max_context_tokens: the longest prompt chunk's context after the step (the
        prefill attention's longest walk over keys, as when one chunk sits behind a long
        cached prefix and another behind none; 0 without a chunk).
        decode_distinct_context_tokens: decode_context_tokens less the tokens of KV blocks
        read again, by a decode of the step whose table holds a block another decode's table
        already holds (prefix-cache hits: the decode attention kernel reads such a block once
        per sequence, every read after the first mostly from L2); `repeated_kv_tokens`.
        Exact, not an estimate, for block tables shared the prefix cache's way (a shared
        block is full, and whoever holds it holds the same blocks before it); a prefill chunk
        reading the same blocks in the step does not count. O(decodes) Python for
        decode-only steps with no sharing (a set of first blocks); a group of k decodes
        with a common first block costs O(k) more (a bisection for a table whose shared
        prefix ends elsewhere than the one before).
        decode_span_tokens (only with a `decode_plan`): the decode attention's longest chain
        of work under the engine's split-KV plan (`DecodePlan.span_tokens`: heterogeneous
        contexts and a plan rounding up past one wave of programs cost more than their summed
        context says); O(decodes) numpy plus a heap over the items past one wave.
        decode_split_seqs (only with a `decode_plan`): the decodes the plan cuts into more
        than one share, whose partial outputs the merge kernel combines
        (`DecodePlan.split_seqs`), from the same plan; decode_work_items (only with a
        `decode_plan`): the plan's items, each a program per KV head with fixed work."""
        starts = self.num_computed_tokens
        num_seqs = len(starts)
        decode_ctx = prefill_ctx = prefill_kv = prefill_pairs = prefill_max = 0
        if self.num_prefill_tokens == 0:   # decode only: the sum and max run in C
            decode_ctx = sum(starts) + num_seqs
            max_ctx = max(starts) + 1 if num_seqs else 0
            num_sampled = num_seqs
            decoders = self.seqs
            decode_lens = None     # made only for a decode plan
        else:
            max_ctx = max(map(int.__add__, starts, self.num_new_tokens))
            decoders, decode_lens = [], []
            for seq, start, n in zip(self.seqs, starts, self.num_new_tokens):
                if n == 1 and start >= seq.num_prompt_tokens:
                    decode_ctx += start + 1
                    decoders.append(seq)
                    decode_lens.append(start + 1)
                else:
                    end = start + n
                    prefill_ctx += n * end
                    prefill_kv += end
                    prefill_max = max(prefill_max, end)
                    prefill_pairs += n * start + n * (n + 1) // 2
            num_sampled = sum(self.sample)
        try:    # the usual case: no two decodes share their first block, so none shares any
            shared = len({seq.block_table[0] for seq in decoders}) < len(decoders)
        except IndexError:   # a table not allocated (hand-built batches): it shares nothing
            shared = True
        distinct = decode_ctx - repeated_kv_tokens([s.block_table for s in decoders],
                                                   self.block_size) if shared else decode_ctx
        out = {"num_seqs": num_seqs, "num_batched_tokens": self.num_batched_tokens,
               "num_prefill_tokens": self.num_prefill_tokens,
               "num_decode_seqs": self.num_decode_seqs, "num_sampled": num_sampled,
               "decode_context_tokens": decode_ctx, "decode_distinct_context_tokens": distinct,
               "prefill_context_tokens": prefill_ctx,
               "prefill_kv_tokens": prefill_kv, "prefill_attention_pairs": prefill_pairs,
               "max_context_tokens": max_ctx, "prefill_max_context_tokens": prefill_max,
               "num_preempted": self.num_preempted, "prefix_hit_tokens": self.prefix_hit_tokens,
               "kv_blocks_used": self.kv_blocks_used}
        if self.decode_plan is not None:
            decode_only = self.num_prefill_tokens == 0
            if decode_only:
                decode_lens = [s + 1 for s in starts]
            out.update(self.decode_plan.step_features(decode_lens, decode_only))
        return out

    def record(self, start: float, duration: float) -> dict:
        """One row of `steps.parquet`: when the step ran, how long, and its `features()`."""
        return {"start_s": start, "duration_s": duration, **self.features()}


def repeated_kv_tokens(tables: list[list[int]], block_size: int) -> int:
    """Tokens of the blocks in `tables` read again: (references - distinct blocks) x
    `block_size`, for tables shared the prefix cache's way (a cached prefix starts at block
    0, so only tables with the same first block share blocks: they are counted per first
    block). ValueError if blocks are shared and `block_size` is not given."""
    groups: dict[int, list] = {}
    for table in tables:
        if table:
            groups.setdefault(table[0], []).append(table)
    # references minus distinct blocks per group: exact even where a concurrent prompt
    # registered a duplicate of a block (two tables can then share a later block but not
    # the one before it)
    repeated = sum(sum(map(len, group)) - len(set().union(*group))
                   for group in groups.values() if len(group) > 1)
    if repeated and block_size <= 0:
        raise ValueError("Batch.block_size is not set: the tokens of shared KV blocks are unknown")
    return repeated * block_size

