"""Event skipping: a stretch of identical decode steps, applied at once.

Between events that change the schedule (an arrival, a finish, a preemption, a prompt
chunk), a step's batch is always the same: every running sequence computes one token.
`plan_decode_stretch` checks that the scheduler is in such a state and bounds how many
such steps can follow (until the first sequence reaches its length, or until the pool
would run out and the scheduler would preempt). `DecodeStretch.features(j)` is what
`Batch.features()` would say of step j. `DecodeStretch.apply(k, times)` leaves the
scheduler exactly as k rounds of `schedule` + `update` would: the same blocks handed out
in the same order, the same full blocks registered in the prefix cache in the same order,
the same tokens and token times, the same finishes (only ever at the last step).

The executor picks k (the simulator: the steps that end before the next arrival) and
gives each step's end time. Per stretch the work is O(running sequences + blocks
allocated), not O(running sequences x steps).
"""
from array import array

from xxhash import xxh64_intdigest

from policy.batch import Batch
from policy.block_manager import root_hash
from policy.scheduler import Scheduler
from policy.sequence import PLACEHOLDER, Sequence, SequenceStatus

RUNNING, FINISHED = SequenceStatus.RUNNING, SequenceStatus.FINISHED


class DecodeStretch:
    """Up to `max_steps` plain decode steps of `seqs` (the running sequences, in order).
    Made by `plan_decode_stretch`; `apply` it once."""

    __slots__ = ("scheduler", "seqs", "tokens", "starts", "max_steps", "alloc_groups",
                 "reg_groups", "alloc_prefix", "context0", "max0", "used0", "applied")

    def __init__(self, scheduler, seqs, tokens, starts, max_steps, alloc_groups, reg_groups,
                 context0, used0, max0=0):
        self.scheduler = scheduler
        self.seqs, self.tokens, self.starts = seqs, tokens, starts
        self.max_steps = max_steps
        # Sequence i needs a new block at steps j = a_i (mod block_size), and fills (and
        # registers) one at steps j = r_i (mod block_size): grouped by residue, in
        # running order (the order `_schedule_running` and `update` visit them).
        self.alloc_groups, self.reg_groups = alloc_groups, reg_groups
        self.alloc_prefix = [0]          # alloc_prefix[m]: allocations at residues < m
        for group in alloc_groups:
            self.alloc_prefix.append(self.alloc_prefix[-1] + len(group))
        self.context0, self.used0, self.max0 = context0, used0, max0
        self.applied = 0

    def allocations_through(self, j: int) -> int:
        """Blocks allocated by steps 0..j together."""
        bs = len(self.alloc_groups)
        return (j // bs) * len(self.seqs) + self.alloc_prefix[j % bs + 1]

    def features(self, j: int) -> dict:
        """`Batch.features()` of step j (0-based) of the stretch."""
        features = self.record(j, 0.0, 0.0)
        del features["start_s"], features["duration_s"]
        return features

    def record(self, j: int, start: float, duration: float) -> dict:
        """`Batch.record(start, duration)` of step j: the same keys, in the same order."""
        num_seqs = len(self.seqs)
        return {"start_s": start, "duration_s": duration, "num_seqs": num_seqs, "num_batched_tokens": num_seqs, "num_prefill_tokens": 0,
                "num_decode_seqs": num_seqs, "num_sampled": num_seqs,
                "decode_context_tokens": self.context0 + (j + 1) * num_seqs,
                "prefill_context_tokens": 0, "prefill_kv_tokens": 0, "prefill_attention_pairs": 0,
                "max_context_tokens": self.max0 + j + 1,
                "num_preempted": 0, "prefix_hit_tokens": 0,
                "kv_blocks_used": self.used0 + self.allocations_through(j)}

    def apply(self, k: int, times: list[float], in_flight: bool = False) -> list[Sequence]:
        """Run steps 0..k-1 (1 <= k <= max_steps). `times[j]`: the time of step j's tokens
        (as `update`, then `receive`, would set them). `in_flight`: the last step's tokens
        are not received yet (asynchronous scheduling): it leaves PLACEHOLDERs, to be
        replaced by `Scheduler.receive(stretch.batch(k - 1), ...)`. Returns the sequences
        the last step finished (by length), as `update` would."""
        if not 1 <= k <= self.max_steps or len(times) != k:
            raise ValueError(f"a stretch of {self.max_steps} steps cannot apply {k} steps "
                             f"with {len(times)} times")
        sched = self.scheduler
        bm, bs = sched.block_manager, sched.block_size
        seqs, tokens, starts = self.seqs, self.tokens, self.starts
        # Tokens first: a block registered at step j hashes only tokens before c + j + 1,
        # all of them received by then.
        finished = []
        for seq, token, start in zip(seqs, tokens, starts):
            ids = seq.token_ids
            if k > 1:
                ids += array("q", (token,)) * (k - 1)
            ids.append(PLACEHOLDER if in_flight else token)
            seq.num_computed_tokens = start + k
            seq.token_times += times
            num_tokens = seq.num_tokens = seq.num_tokens + k
            if num_tokens >= seq.max_num_tokens:
                finished.append(seq)
        # Step j: schedule() hands out blocks (in running order), then update() registers
        # the blocks the step filled (in running order). Registration is `register`'s,
        # inlined: block i of a sequence fills at the step that computes its token
        # (i + 1) * bs - 1, and a hash once computed (before a preemption, say) is reused.
        take, groups, regs = bm.take, self.alloc_groups, self.reg_groups
        caching, cache_block = bm.enable_prefix_caching, bm.cache_block
        for j in range(k):
            r = j % bs
            group = groups[r]
            if group:
                for seq, block in zip(group, take(len(group))):
                    seq.block_table.append(block)
            for seq, start in regs[r]:
                i = (start + j) // bs            # the block step j fills
                seq.num_registered_blocks = i + 1
                if not caching:
                    continue
                hashes = seq.block_hashes
                if len(hashes) > i:
                    h = hashes[i]
                else:
                    h = xxh64_intdigest(seq.token_ids[i * bs:(i + 1) * bs],
                                        hashes[-1] if i else root_hash(seq.extra_keys))
                    hashes.append(h)
                cache_block(h, seq.block_table[i])
        for seq in finished:
            seq.status, seq.finish_reason, seq.finish_time = FINISHED, "length", times[-1]
        for seq in finished:
            sched.running.remove(seq)
            del sched.sequences[seq.seq_id]
            bm.free_blocks(seq)
        self.applied = k
        self.max_steps = 0      # applied: the plan no longer describes the state
        return finished

    def batch(self, j: int) -> Batch:
        """The `Batch` step j was (for the executor's in-flight step)."""
        n = len(self.seqs)
        return Batch(seqs=list(self.seqs), num_new_tokens=[1] * n,
                     num_computed_tokens=[start + j for start in self.starts], sample=[True] * n,
                     num_batched_tokens=n, num_decode_seqs=n,
                     kv_blocks_used=self.used0 + self.allocations_through(j))


def plan_decode_stretch(sched: Scheduler, token_of: dict) -> DecodeStretch | None:
    """The decode stretch that starts at the scheduler's next step, or None if that step
    is not a plain decode step of every running sequence: nothing running, a prompt (or
    chunk) still to compute, a waiting request the policy could admit, a token that would
    stop a sequence, or a block table that does not end at the computed tokens.
    `token_of[seq_id]`: the token every step samples for that sequence.

    Admission is ruled out only where it cannot even be tried (nothing waits, or
    max_num_seqs sequences run): an admission that would fail for want of blocks is not
    predicted. The stretch ends at the step where the first sequence reaches its length,
    or before the step whose allocation the free pool could not serve."""
    running = sched.running
    if not running:
        return None
    newest = running[-1]     # the one most likely still in its prompt: check it first
    if newest.num_computed_tokens != newest.num_tokens - 1 or newest.num_tokens <= newest.num_prompt_tokens:
        return None
    waiting = sched.waiting
    if waiting and (len(running) < sched.config.max_num_seqs or waiting[0].num_computed_tokens):
        return None
    bm, bs = sched.block_manager, sched.block_size
    alloc_groups = [[] for _ in range(bs)]
    reg_groups = [[] for _ in range(bs)]
    tokens, starts, lefts = [], [], []
    for seq in running:
        start = seq.num_computed_tokens
        num_tokens = seq.num_tokens
        if (start != num_tokens - 1 or start < seq.num_prompt_tokens   # a prompt's last token is prefill
                or seq.num_registered_blocks != start // bs):
            return None
        token = token_of[seq.seq_id]
        if not seq.ignore_eos and token in seq.eos_token_ids:
            return None
        first_alloc = len(seq.block_table) * bs - start     # the step that computes past the table
        if not 0 <= first_alloc < bs:
            return None
        alloc_groups[first_alloc].append(seq)
        reg_groups[(bs - 1 - start) % bs].append((seq, start))
        tokens.append(token)
        starts.append(start)
        lefts.append(seq.max_num_tokens - num_tokens)
    context0, max_steps = sum(starts), min(lefts)
    stretch = DecodeStretch(sched, list(running), tokens, starts, max_steps, alloc_groups,
                            reg_groups, context0, bm.num_used_blocks, max(starts) if starts else 0)
    # The pool: find the last step whose allocations (with all before) still fit.
    free, per_cycle = bm.num_free_blocks, len(running)
    cycles, rest = divmod(free, per_cycle)
    last = max(m for m in range(bs + 1) if stretch.alloc_prefix[m] <= rest)   # residues fully served
    stretch.max_steps = min(max_steps, cycles * bs + last)
    return stretch if stretch.max_steps > 0 else None
