"""Continuous-batching scheduler: decides, each step, which sequences compute how many tokens.

Two policies share admission, preemption and bookkeeping:

- `chunked` (vLLM V1, Sarathi-Serve): one token budget per step. Running sequences go first
  (one decode token each, or the next chunk of an unfinished prompt), oldest first; then
  waiting ones in FCFS order, the last admitted chunked to fit the budget. Prefill and decode
  share the step. A step that had to preempt admits nobody.
- `prefill_first` (nano-vLLM, vLLM V0): if any waiting prompt fits, a prefill-only step
  (only its first prompt may be chunked; it holds blocks for its whole prompt); otherwise
  one decode step for every running sequence.

Preemption is by recompute: the victim is the newest running sequence; it frees its blocks,
forgets its KV (`num_computed_tokens = 0`) and goes to the front of the waiting queue.
"""
from collections import deque

from policy.batch import Batch
from policy.block_manager import BlockManager
from policy.config import CacheConfig, SchedulerConfig
from policy.decode_plan import DecodePlan
from policy.sequence import PLACEHOLDER, Sequence, SequenceStatus

WAITING, RUNNING, FINISHED = SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.FINISHED


class Scheduler:
    """`add` requests, then per step: `schedule(now)` -> executor -> `update(batch, ...)`,
    and `receive(batch, ...)` when the step's tokens were not known at `update` (the step
    loop of both executors: policy.step_loop). `decode_plan`: the executor's split-KV decode
    plan (policy.decode_plan), given to every batch so its record has `decode_span_tokens`
    (None: no such feature)."""

    def __init__(self, config: SchedulerConfig, cache: CacheConfig, num_blocks: int,
                 decode_plan: DecodePlan | None = None):
        config.validate_with(cache)
        self.config = config
        self.block_size = cache.block_size
        self.decode_plan = decode_plan
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # admission order: oldest first, victims from the end
        self.sequences: dict = {}           # seq_id -> unfinished Sequence
        self.num_preemptions = 0
        self._schedule_policy = {"chunked": self._schedule_chunked,
                                 "prefill_first": self._schedule_prefill_first}[config.policy]

    # ---- requests ------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a request. Raises ValueError, naming the request and the limit, if it could
        never run: so nothing hangs waiting for room that will never exist."""
        cfg, n = self.config, seq.num_prompt_tokens
        if n == 0:
            raise ValueError(f"request {seq.seq_id!r}: empty prompt")
        if seq.max_tokens < 1:
            raise ValueError(f"request {seq.seq_id!r}: max_tokens must be >= 1, got {seq.max_tokens}")
        if seq.seq_id in self.sequences:
            raise ValueError(f"request {seq.seq_id!r} is already queued or running")
        longest = n + seq.max_tokens
        if longest > cfg.max_model_len:
            raise ValueError(
                f"request {seq.seq_id!r}: prompt ({n} tokens) + max_tokens ({seq.max_tokens}) = "
                f"{longest} exceeds max_model_len={cfg.max_model_len}")
        # The longest it gets is recomputed in one piece after a preemption: its KV must fit.
        blocks = -(-(longest - 1) // self.block_size)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"request {seq.seq_id!r}: needs {blocks} KV blocks of {self.block_size} tokens "
                f"({longest - 1} tokens) but the whole pool has {self.block_manager.num_blocks}")
        seq.status = WAITING
        self.sequences[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id) -> bool:
        """Drop an unfinished request and free its blocks. False if unknown or finished."""
        seq = self.sequences.get(seq_id)
        if seq is None:
            return False
        self.finish(seq, "abort", None)
        return True

    def finish(self, seq: Sequence, reason: str, now: float | None) -> None:
        """Finish an unfinished sequence outside `update` and free its blocks: an abort, or
        a stop token learnt of only after the next step was scheduled (`receive`). A no-op
        for a finished sequence."""
        if self.sequences.pop(seq.seq_id, None) is None:
            return
        if seq.status is RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free_blocks(seq)
        seq.status, seq.finish_reason, seq.finish_time = FINISHED, reason, now

    def has_unfinished(self) -> bool:
        return bool(self.sequences)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- the step ------------------------------------------------------------------
    def schedule(self, now: float) -> Batch:
        """Choose this step's work and allocate its KV blocks. The batch may be empty."""
        batch = Batch(block_size=self.block_size, decode_plan=self.decode_plan)
        self._schedule_policy(batch, now)
        batch.kv_blocks_used = self.block_manager.num_used_blocks
        return batch

    def update(self, batch: Batch, token_ids, now: float) -> list[Sequence]:
        """Apply a step's results: advance computed tokens, register full blocks in the prefix
        cache, append sampled tokens (one per batch entry; ignored where `sample` is False),
        finish sequences and free their blocks. Returns the sequences finished this step.

        `token_ids=None`: the step was launched but its tokens are not known yet. Each
        sampled sequence gets a PLACEHOLDER (at time `now`) and only a length limit can
        finish it here; `receive` puts the tokens in later."""
        finished = self._advance(batch, token_ids, now)
        if finished:
            self._release(finished)
        return finished

    def _advance(self, batch: Batch, token_ids, now: float) -> list[Sequence]:
        """`update` up to releasing what it finished (returned with their status set, still
        in `running` and holding their blocks)."""
        bm, bs, finished_status = self.block_manager, self.block_size, FINISHED
        if token_ids is None:
            token_ids = [PLACEHOLDER] * len(batch.seqs)
        finished = []
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, token_ids):
            if seq.status is finished_status:   # aborted (or stopped) while the step ran
                continue
            computed = seq.num_computed_tokens = seq.num_computed_tokens + n
            if computed // bs > seq.num_registered_blocks:
                bm.register(seq)
            num_tokens = seq.num_tokens
            if computed < num_tokens:   # a prefill chunk: nothing sampled
                continue
            seq.token_ids.append(token)
            seq.num_tokens = num_tokens = num_tokens + 1
            seq.token_times.append(now)
            if num_tokens >= seq.max_num_tokens:
                seq.finish_reason = "length"
            elif not seq.ignore_eos and token in seq.eos_token_ids:
                seq.finish_reason = "stop"
            else:
                continue
            seq.status = FINISHED
            seq.finish_time = now
            finished.append(seq)
        return finished

    def _release(self, finished: list[Sequence]) -> None:
        """Drop sequences `update` finished from the running batch and free their blocks,
        in order (the order blocks return to the free list)."""
        running, sequences, free_blocks = self.running, self.sequences, self.block_manager.free_blocks
        for seq in finished:
            running.remove(seq)
            del sequences[seq.seq_id]
            free_blocks(seq)

    def receive(self, batch: Batch, token_ids, now: float) -> list[Sequence]:
        """The tokens of a step that `update` recorded with placeholders arrive at `now`:
        each replaces its sequence's placeholder and takes `now` as its time. A sequence
        the update finished (length) finishes at `now`; one that sampled a stop token
        finishes now, a step late: it may already sit in the next step, whose update then
        skips it (its slot there is wasted, its output unchanged). Returns the batch's
        sequences complete with this step (length or stop; not aborted ones)."""
        done = []
        for seq, sample, token in zip(batch.seqs, batch.sample, token_ids):
            if not sample or seq.token_ids[-1] != PLACEHOLDER:   # nothing sampled, or aborted
                continue
            seq.token_ids[-1] = token
            seq.token_times[-1] = now
            if seq.status is FINISHED:
                if seq.finish_reason == "length":
                    seq.finish_time = now       # the last token exists only now
                    done.append(seq)
            elif not seq.ignore_eos and token in seq.eos_token_ids:
                self.finish(seq, "stop", now)
                done.append(seq)
        return done

    # ---- policies ------------------------------------------------------------------
    def _add_to_batch(self, batch: Batch, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.num_computed_tokens.append(start)
        sample = start + n == seq.num_tokens
        batch.sample.append(sample)
        batch.num_batched_tokens += n
        if n == 1 and start >= seq.num_prompt_tokens:
            batch.num_decode_seqs += 1
        else:
            batch.num_prefill_tokens += n

    def _preempt_newest(self, batch: Batch) -> Sequence:
        """Preempt by recompute the newest running sequence and return it."""
        seq = self.running.pop()
        self.block_manager.free_blocks(seq)
        seq.status = WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        batch.num_preempted += 1
        self.waiting.appendleft(seq)
        return seq

    def _schedule_running(self, batch: Batch, budget: int, cap: int) -> int:
        """Give each running sequence its next tokens, oldest first, preempting the newest
        when blocks run out. Returns the budget left. (The hot loop of every step: the
        bookkeeping of `_add_to_batch` is inlined.)"""
        bm, running, bs = self.block_manager, self.running, self.block_size
        seqs, new_tokens, starts, sample = batch.seqs, batch.num_new_tokens, batch.num_computed_tokens, batch.sample
        num_decode = num_prefill = 0
        # Preemption only pops from the end of `running`, which a for loop tolerates.
        for seq in running:
            if budget <= 0:
                break
            start = seq.num_computed_tokens
            n = seq.num_tokens - start
            if n > budget:
                n = budget
            if n > cap:
                n = cap
            if start + n > len(seq.block_table) * bs:
                while not bm.allocate(seq, start + n):
                    victim = self._preempt_newest(batch)
                    if victim is seq:      # it was the newest: nothing left to schedule
                        break
                if seq.status is WAITING:
                    break
            seqs.append(seq)
            new_tokens.append(n)
            starts.append(start)
            sample.append(start + n == seq.num_tokens)
            if n == 1 and start >= seq.num_prompt_tokens:
                num_decode += 1
            else:
                num_prefill += n
            budget -= n
        batch.num_decode_seqs += num_decode
        batch.num_prefill_tokens += num_prefill
        batch.num_batched_tokens += num_decode + num_prefill
        return budget

    def _admit(self, batch: Batch, now: float, budget: int, cap: int, whole_prompt: bool) -> int:
        """Admit waiting sequences FCFS while budget, `max_num_seqs` and blocks allow; the
        last one may be chunked. With `whole_prompt`, blocks for all known tokens are taken
        at admission and only the batch's first sequence may be chunked."""
        bm, cfg = self.block_manager, self.config
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            hits = bm.match_prefix(seq)
            remaining = seq.num_tokens - len(hits) * self.block_size
            n = min(remaining, budget, cap)
            if whole_prompt and n < remaining and batch.seqs:
                break
            if not bm.can_admit(seq, hits, seq.num_tokens if whole_prompt else seq.num_tokens - remaining + n):
                break   # head-of-line: FCFS admission never skips ahead
            self.waiting.popleft()
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            bm.admit(seq, hits)
            bm.allocate(seq, seq.num_tokens if whole_prompt else seq.num_computed_tokens + n)
            batch.prefix_hit_tokens += seq.num_cached_tokens
            self._add_to_batch(batch, seq, n)
            budget -= n
            if whole_prompt and n < remaining:   # stays at the head of the queue, holding its blocks
                self.waiting.appendleft(seq)
                break
            seq.status = RUNNING
            self.running.append(seq)
        return budget

    def _schedule_chunked(self, batch: Batch, now: float) -> None:
        cfg = self.config
        cap = cfg.long_prefill_token_threshold or cfg.max_num_batched_tokens
        budget = self._schedule_running(batch, cfg.max_num_batched_tokens, cap)
        if not batch.num_preempted:
            self._admit(batch, now, budget, cap, whole_prompt=False)

    def _schedule_prefill_first(self, batch: Batch, now: float) -> None:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        head = self.waiting[0] if self.waiting else None
        if head is not None and head.num_computed_tokens:   # finish a chunked prompt first
            self.waiting.popleft()
            n = min(head.num_tokens - head.num_computed_tokens, budget)
            self._add_to_batch(batch, head, n)
            budget -= n
            if head.num_computed_tokens + n < head.num_tokens:
                self.waiting.appendleft(head)
                return
            head.status = RUNNING
            self.running.append(head)
        self._admit(batch, now, budget, budget, whole_prompt=True)
        if batch.seqs:
            return
        # Decode step: prefill_first runs decodes only when no prompt could be admitted.
        self._schedule_running(batch, budget, 1)
