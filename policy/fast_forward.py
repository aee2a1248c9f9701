"""Event skipping: the scheduler's steps while every running sequence decodes, taken one
step at a time in O(blocks), with each sequence's tokens and counters written back once.

While every running sequence decodes one token per step, a step changes little: each
sequence's counters move by one and a sequence touches the pool only every `block_size`
steps (one block taken, one filled and registered). A `DecodeStretch` keeps each running
sequence's position relative to a step counter (its *virtual start*: computed tokens =
virtual start + step), groups the sequences by the step residue (mod block_size) at which
they take and fill a block, and leaves `token_ids`, `token_times`, `num_tokens` and
`num_computed_tokens` untouched until `close` writes them back. What a stretch does at
step j is what `Scheduler.schedule` + `update` would do, in the same order:

- `schedule(now)`: the blocks the step's decodes need, handed out in running order; then,
  with the chunked policy, the admission of waiting requests, by the scheduler's own
  `_admit` (so a new request's prompt joins the stretch's step as a prefill chunk). It
  returns the step's record (`Batch.record`), or None when step j is not one a stretch
  can take (the pool would run out and the scheduler preempt; prefill_first would run a
  prompt), changing nothing.
- `update(now)`: the full blocks the step filled registered in the prefix cache (running
  order, then the new prompts'), new requests advanced by the scheduler's `_advance`,
  sequences reaching their length finished and their blocks freed (the same order as
  `update`). A new request whose whole prompt was computed joins the decoding sequences;
  one still chunked, finished or stopping ends the stretch after this step.

The caller (the simulator) forms the steps' times and gives `close` each step's token time.
The scheduler's state is current after every step for everything but the decoding
sequences' tokens and counters, which only `close` writes (the policy is their only
writer, and no one else reads them until the stretch is closed; the block manager, which
may hash their blocks when a lookup finds their chain, reads their tokens as
`BlockManager.lagging` says).
"""
from array import array

from policy.batch import Batch, repeated_kv_tokens
from policy.block_manager import DEFERRED
from policy.scheduler import Scheduler
from policy.sequence import PLACEHOLDER, Sequence, SequenceStatus

FINISHED = SequenceStatus.FINISHED


class DecodeStretch:
    """Steps of a scheduler whose running sequences all decode. Made by
    `plan_decode_stretch`; then `schedule` + `update` per step, and `close` once.
    `token_of[seq_id]`: the token every step samples for that sequence."""

    def __init__(self, scheduler: Scheduler, token_of: dict):
        self.scheduler, self.token_of = scheduler, token_of
        bs = scheduler.block_size
        # Sequence s takes a block at steps j = -v (mod bs) and fills one at j = -1 - v,
        # v its virtual start; each group in running order (the order the scheduler visits).
        self.alloc_groups = [[] for _ in range(bs)]
        self.reg_groups = [[] for _ in range(bs)]
        # seq -> (virtual start, token, first step it decodes, leading token_ids that are
        # final (the rest, a placeholder included, is `token`), whether its last token is
        # one a step before `first` sampled, not received yet)
        self.members: dict[Sequence, tuple] = {}
        self.finishing: dict[int, list] = {}   # step -> members its update finishes
        self.left = []                  # (seq, its entry, steps it ran to) finished members
        self.sum_starts = self.max_start = 0
        # Decodes sharing KV blocks (prefix-cache hits) share their first block: members by
        # first block, and the tokens they read again (`repeated_kv_tokens`), which only a
        # join or a leave changes (a stretch appends blocks nobody else holds): a group it
        # changed is counted again once, at the next step.
        self.by_first: dict[int, list] = {}
        self.group_repeated: dict[int, int] = {}
        self.changed: set[int] = set()
        self.repeated = 0
        self.max_stale = False
        self.j = 0                      # steps taken
        self.ended = False              # the last step taken ends the stretch
        self.admitted: Batch | None = None   # the current step's new requests
        self.num_decoding = 0           # sequences decoding in the current step
        self.step_decoders = None       # those, saved when some finished at the step
        self.kv_blocks_used = 0
        self.chunked = scheduler.config.policy == "chunked"
        # The members' tokens past `final` are `token` until `close` writes them: the block
        # manager reads them so (it may hash a member's blocks when a lookup finds them).
        self.lagging = scheduler.block_manager.lagging

    def join(self, seq: Sequence, first: int) -> bool:
        """Make running `seq` decode from step `first`. False (nothing changed) if its next
        step would not be a plain decode: a prompt still to compute, a token that would
        stop it, blocks or prefix-cache entries not matching its computed tokens."""
        bs = self.scheduler.block_size
        start = seq.num_computed_tokens
        if (start != seq.num_tokens - 1 or start < seq.num_prompt_tokens
                or seq.num_registered_blocks != start // bs
                or not 0 <= len(seq.block_table) * bs - start < bs):
            return False
        token = self.token_of[seq.seq_id]
        if not seq.ignore_eos and token in seq.eos_token_ids:
            return False
        v = start - first
        ids = seq.token_ids
        members = self.members
        pending = ids[-1] == PLACEHOLDER
        members[seq] = (v, token, first, len(ids) - pending, pending and first > 0)
        self.lagging[seq] = (len(ids) - pending, token)
        self.alloc_groups[-v % bs].append(seq)
        self.reg_groups[(-1 - v) % bs].append(seq)
        last = first + seq.max_num_tokens - seq.num_tokens - 1   # its update finishes it
        finishing = self.finishing.get(last)
        if finishing is None:
            self.finishing[last] = [seq]
        else:
            finishing.append(seq)
        self.sum_starts += v
        self._share(seq, +1)
        if v > self.max_start or len(members) == 1:
            self.max_start = v
        return True

    def _share(self, seq: Sequence, sign: int) -> None:
        """`seq` joins (+1) or leaves (-1) the decoding members (`_count_shared` then
        counts its group again)."""
        first = seq.block_table[0]
        group = self.by_first.get(first)
        if group is None:
            self.by_first[first] = [seq]    # alone: shares nothing
            return
        if sign > 0:
            group.append(seq)
        else:
            group.remove(seq)
            if not group:
                del self.by_first[first]
        self.changed.add(first)

    def _count_shared(self) -> None:
        """`repeated` after the joins and leaves since the last step."""
        bs, by_first, counted = self.scheduler.block_size, self.by_first, self.group_repeated
        for first in self.changed:
            group = by_first.get(first)
            now = repeated_kv_tokens([s.block_table for s in group], bs) if group and len(group) > 1 else 0
            self.repeated += now - counted.pop(first, 0)
            if now:
                counted[first] = now
        self.changed.clear()

    def _repeated_with(self, admitted: Batch) -> int:
        """Tokens the step's admitted decodes (sequences re-admitted with prefix hits up to
        their last token) read again from blocks of the members they share a first block
        with: counted by neither `repeated` nor the admitted batch's own features."""
        extra: dict[int, list] = {}
        for seq, n, start in zip(admitted.seqs, admitted.num_new_tokens, admitted.num_computed_tokens):
            table = seq.block_table
            if n == 1 and start >= seq.num_prompt_tokens and table[0] in self.by_first:
                extra.setdefault(table[0], []).append(table)
        bs, joint = self.scheduler.block_size, 0
        for first, tables in extra.items():
            members = [s.block_table for s in self.by_first[first]]
            joint += (repeated_kv_tokens(members + tables, bs) - repeated_kv_tokens(members, bs)
                      - repeated_kv_tokens(tables, bs))
        return joint

    # ---- one step ------------------------------------------------------------------
    def schedule(self, now: float) -> dict | None:
        """Form step j at `now` (as `Scheduler.schedule`) and return its record, or None
        (nothing changed) if it is not a step this stretch can take."""
        sched = self.scheduler
        running, waiting, cfg = sched.running, sched.waiting, sched.config
        num_dec = len(self.members)
        if self.ended or num_dec > cfg.max_num_batched_tokens:
            return None
        if waiting and not self.chunked and (len(running) < cfg.max_num_seqs
                                             or waiting[0].num_computed_tokens):
            return None     # prefill_first would run a prompt
        bm, j = sched.block_manager, self.j
        group = self.alloc_groups[j % sched.block_size]
        if group:
            if len(group) > bm.num_free_blocks:
                return None     # the scheduler would preempt
            for seq, block in zip(group, bm.take(len(group))):
                seq.block_table.append(block)
        admitted = None
        if waiting and len(running) < cfg.max_num_seqs:
            admitted = Batch(block_size=sched.block_size)
            sched._admit(admitted, now, cfg.max_num_batched_tokens - num_dec,
                         cfg.long_prefill_token_threshold or cfg.max_num_batched_tokens, False)
            if not admitted.seqs:
                admitted = None
                if not num_dec:
                    return None     # an empty step: nothing to run
        self.admitted, self.num_decoding = admitted, num_dec
        self.kv_blocks_used = used = bm.num_used_blocks
        if self.max_stale:
            self.max_start = max((m[0] for m in self.members.values()), default=0)
            self.max_stale = False
        if self.changed:
            self._count_shared()
        context = self.sum_starts + (j + 1) * num_dec
        longest = self.max_start + j + 1 if num_dec else 0
        if admitted is None:
            record = {"start_s": now, "duration_s": 0.0, "num_seqs": num_dec,
                      "num_batched_tokens": num_dec, "num_prefill_tokens": 0,
                      "num_decode_seqs": num_dec, "num_sampled": num_dec,
                      "decode_context_tokens": context,
                      "decode_distinct_context_tokens": context - self.repeated,
                      "prefill_context_tokens": 0,
                      "prefill_kv_tokens": 0, "prefill_attention_pairs": 0,
                      "max_context_tokens": longest, "prefill_max_context_tokens": 0,
                      "num_preempted": 0, "prefix_hit_tokens": 0,
                      "kv_blocks_used": used}
            if sched.decode_plan is not None:
                record.update(self._plan_features(running, num_dec, None))
            return record
        f = admitted.features()
        record = {"start_s": now, "duration_s": 0.0, "num_seqs": num_dec + f["num_seqs"],
                  "num_batched_tokens": num_dec + f["num_batched_tokens"],
                  "num_prefill_tokens": f["num_prefill_tokens"],
                  "num_decode_seqs": num_dec + f["num_decode_seqs"],
                  "num_sampled": num_dec + f["num_sampled"],
                  "decode_context_tokens": context + f["decode_context_tokens"],
                  "decode_distinct_context_tokens": (context - self.repeated
                                                     + f["decode_distinct_context_tokens"]
                                                     - (self._repeated_with(admitted) if f["num_decode_seqs"] else 0)),
                  "prefill_context_tokens": f["prefill_context_tokens"],
                  "prefill_kv_tokens": f["prefill_kv_tokens"],
                  "prefill_attention_pairs": f["prefill_attention_pairs"],
                  "max_context_tokens": max(longest, f["max_context_tokens"]),
                  "prefill_max_context_tokens": f["prefill_max_context_tokens"],
                  "num_preempted": 0, "prefix_hit_tokens": f["prefix_hit_tokens"],
                  "kv_blocks_used": used}
        if sched.decode_plan is not None:
            record.update(self._plan_features(running, num_dec, admitted))
        return record

    def _plan_features(self, running: list, num_dec: int, admitted: Batch | None) -> dict:
        """`decode_span_tokens` and `decode_split_seqs` of step j (Batch.features' with the
        scheduler's decode plan: DecodePlan.step_features):
        the decodes in batch order, the members (the first `num_dec` running, in running
        order) then the admitted batch's decodes."""
        members, ahead = self.members, self.j + 1
        lens = [members[seq][0] + ahead for seq in running[:num_dec]]
        decode_only = True
        if admitted is not None:
            lens += [start + 1 for seq, n, start in zip(admitted.seqs, admitted.num_new_tokens,
                                                        admitted.num_computed_tokens)
                     if n == 1 and start >= seq.num_prompt_tokens]
            decode_only = admitted.num_prefill_tokens == 0
        return self.scheduler.decode_plan.step_features(lens, decode_only)

    def update(self, now: float) -> None:
        """Land step j at `now` (as `Scheduler.update` with the tokens not yet known)."""
        sched = self.scheduler
        bm, bs, j, members = sched.block_manager, sched.block_size, self.j, self.members
        regs = self.reg_groups[j % bs]
        if regs and bm.enable_prefix_caching:
            self._register(regs, j)
        elif regs:
            for seq in regs:
                seq.num_registered_blocks = (members[seq][0] + j) // bs + 1
        admitted = self.admitted
        finished = sched._advance(admitted, None, now) if admitted is not None else []
        leaving = self.finishing.pop(j, None)
        self.step_decoders = None
        if leaving:
            self.step_decoders = sched.running[:self.num_decoding]
            for seq in leaving:
                seq.status, seq.finish_reason, seq.finish_time = FINISHED, "length", now
                entry = members.pop(seq)
                v = entry[0]
                self.alloc_groups[-v % bs].remove(seq)
                self.reg_groups[(-1 - v) % bs].remove(seq)
                self.sum_starts -= v
                self._share(seq, -1)
                if v == self.max_start:
                    self.max_stale = True
                self.left.append((seq, entry, j + 1))
            finished = leaving + finished
        if finished:
            sched._release(finished)
        self.j = j + 1
        if admitted is not None:
            for seq in admitted.seqs:
                if seq.status is FINISHED or not self.join(seq, j + 1):
                    self.ended = True
        if not sched.running:
            self.ended = True

    def _register(self, regs: list, j: int) -> None:
        """`BlockManager.register` of the block each of `regs` filled at step j (their
        tokens past the stretch's start read from `BlockManager.lagging`). The common case,
        a block of a chain its sequence owns, is inlined: marked deferred."""
        bm, bs, members = self.scheduler.block_manager, self.scheduler.block_size, self.members
        deferred, state, tags = bm._deferred, bm.cache_state, bm.block_hash
        for seq in regs:
            i = (members[seq][0] + j) // bs
            table = seq.block_table
            record = deferred.get(seq.block_hashes[0]) if i else None
            if record is not None and record[1] is table:   # as register_blocks' owner case
                seq.num_registered_blocks = i + 1
                block = table[i]
                state[block] = DEFERRED
                tags[block] = seq.block_hashes[0]
            else:
                bm.register_blocks(seq, i + 1)

    # ---- the end -------------------------------------------------------------------
    def close(self, times: list[float], in_flight: bool = False) -> list[Sequence]:
        """Write the stretch back after its k = len(times) steps; `times[j]` is the time of
        step j's tokens. `in_flight`: the last step's tokens are not received yet
        (asynchronous scheduling): it leaves PLACEHOLDERs, to be replaced by
        `Scheduler.receive(*stretch.last_step())`; otherwise they are received at
        times[-1]. Returns the sequences completed by received steps."""
        k = self.j
        if len(times) != k:
            raise ValueError(f"a stretch of {k} steps cannot take {len(times)} times")
        done = []
        self.lagging.clear()
        write = self._write_back
        for seq, entry in self.members.items():
            write(seq, entry, k, times, in_flight)
        for seq, entry, last in self.left:
            write(seq, entry, last, times, in_flight and last == k)
            if last < k:
                seq.finish_time = times[last - 1]
                done.append(seq)
            elif not in_flight:
                seq.finish_time = times[-1]
                done.append(seq)
        if not in_flight and self.admitted is not None:
            admitted = self.admitted
            tokens = [self.token_of[s.seq_id] if sample else -1
                      for s, sample in zip(admitted.seqs, admitted.sample)]
            done += self.scheduler.receive(admitted, tokens, times[-1])
        return done

    @staticmethod
    def _write_back(seq: Sequence, entry: tuple, last: int, times: list, placeholder: bool) -> None:
        """Steps entry's first .. last - 1 of `seq`, at once."""
        v, token, first, final, pending = entry
        if first >= last:
            return      # joined after the last step: that step's receive completes it
        ids = seq.token_ids
        n = v + last + 1
        del ids[final:]
        ids += array("q", (token,)) * (n - final)
        if placeholder:
            ids[-1] = PLACEHOLDER
        seq.num_tokens = n
        seq.num_computed_tokens = v + last
        token_times = seq.token_times
        if pending:     # the token its prompt sampled, in flight when it joined
            token_times[-1] = times[first - 1]
        token_times += times[first:last]

    def last_step(self) -> tuple[Batch, list[int]]:
        """The last step as the `Batch` it was and its tokens (after `close`)."""
        decoders = self.step_decoders
        if decoders is None:
            decoders = self.scheduler.running[:self.num_decoding]
        n = len(decoders)
        token_of = self.token_of
        batch = Batch(seqs=list(decoders), num_new_tokens=[1] * n,
                      num_computed_tokens=[s.num_computed_tokens - 1 for s in decoders],
                      sample=[True] * n, num_batched_tokens=n, num_decode_seqs=n,
                      kv_blocks_used=self.kv_blocks_used, block_size=self.scheduler.block_size)
        tokens = [token_of[s.seq_id] for s in decoders]
        admitted = self.admitted
        if admitted is not None:
            batch.seqs += admitted.seqs
            batch.num_new_tokens += admitted.num_new_tokens
            batch.num_computed_tokens += admitted.num_computed_tokens
            batch.sample += admitted.sample
            batch.num_batched_tokens += admitted.num_batched_tokens
            batch.num_prefill_tokens += admitted.num_prefill_tokens
            batch.num_decode_seqs += admitted.num_decode_seqs
            batch.prefix_hit_tokens = admitted.prefix_hit_tokens
            tokens += [token_of[s.seq_id] if sample else -1
                       for s, sample in zip(admitted.seqs, admitted.sample)]
        return batch, tokens


def plan_decode_stretch(sched: Scheduler, token_of: dict) -> DecodeStretch | None:
    """A stretch starting at the scheduler's next step, or None if that step would not be
    the stretch's kind: a running sequence with a prompt (or chunk) to compute or a token
    that would stop it; nothing running and nothing to admit; with prefill_first, a
    waiting request it could try to admit. `token_of[seq_id]`: the token every step
    samples for that sequence."""
    running, waiting = sched.running, sched.waiting
    chunked = sched.config.policy == "chunked"
    if waiting:
        if not chunked and (len(running) < sched.config.max_num_seqs or waiting[0].num_computed_tokens):
            return None
    elif not running:
        return None
    if running:
        newest = running[-1]     # the one most likely still in its prompt: check it first
        if newest.num_computed_tokens != newest.num_tokens - 1 or newest.num_tokens <= newest.num_prompt_tokens:
            return None
    stretch = DecodeStretch(sched, token_of)
    join = stretch.join
    for seq in running:
        if not join(seq, 0):
            stretch.lagging.clear()
            return None
    return stretch
