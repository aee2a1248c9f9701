"""The step contract between the policy and an executor."""
from dataclasses import dataclass, field

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
        context after the step: a decode batch's attention ends with its longest sequence).
        O(1) Python for decode-only steps."""
        starts = self.num_computed_tokens
        num_seqs = len(starts)
        decode_ctx = prefill_ctx = prefill_kv = prefill_pairs = 0
        if self.num_prefill_tokens == 0:   # decode only: the sum and max run in C
            decode_ctx = sum(starts) + num_seqs
            max_ctx = max(starts) + 1 if num_seqs else 0
            num_sampled = num_seqs
        else:
            max_ctx = max(map(int.__add__, starts, self.num_new_tokens))
            for seq, start, n in zip(self.seqs, starts, self.num_new_tokens):
                if n == 1 and start >= seq.num_prompt_tokens:
                    decode_ctx += start + 1
                else:
                    end = start + n
                    prefill_ctx += n * end
                    prefill_kv += end
                    prefill_pairs += n * start + n * (n + 1) // 2
            num_sampled = sum(self.sample)
        return {"num_seqs": num_seqs, "num_batched_tokens": self.num_batched_tokens,
                "num_prefill_tokens": self.num_prefill_tokens,
                "num_decode_seqs": self.num_decode_seqs, "num_sampled": num_sampled,
                "decode_context_tokens": decode_ctx, "prefill_context_tokens": prefill_ctx,
                "prefill_kv_tokens": prefill_kv, "prefill_attention_pairs": prefill_pairs,
                "max_context_tokens": max_ctx,
                "num_preempted": self.num_preempted, "prefix_hit_tokens": self.prefix_hit_tokens,
                "kv_blocks_used": self.kv_blocks_used}

    def record(self, start: float, duration: float) -> dict:
        """One row of `steps.parquet`: when the step ran, how long, and its `features()`."""
        return {"start_s": start, "duration_s": duration, **self.features()}
