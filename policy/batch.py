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

    def record(self, start: float, duration: float) -> dict:
        """One row of `steps.parquet`: the step's shape and timing. The work features
        (decode_context_tokens: KV read by decodes; prefill_context_tokens: sum over prefill
        chunks of new tokens x context after the step, the attention work) are what a fitted
        cost model regresses on."""
        decode_ctx = prefill_ctx = num_sampled = 0
        for seq, start_pos, n, sampled in zip(self.seqs, self.num_computed_tokens,
                                              self.num_new_tokens, self.sample):
            if n == 1 and start_pos >= seq.num_prompt_tokens:
                decode_ctx += start_pos + 1
            else:
                prefill_ctx += n * (start_pos + n)
            num_sampled += sampled
        return {"start_s": start, "duration_s": duration, "num_seqs": len(self.seqs),
                "num_batched_tokens": self.num_batched_tokens,
                "num_prefill_tokens": self.num_prefill_tokens,
                "num_decode_seqs": self.num_decode_seqs, "num_sampled": num_sampled,
                "decode_context_tokens": decode_ctx, "prefill_context_tokens": prefill_ctx,
                "num_preempted": self.num_preempted, "prefix_hit_tokens": self.prefix_hit_tokens,
                "kv_blocks_used": self.kv_blocks_used}
