"""BlockManager against a reference model: ownership, ref counts, prefix-cache content."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from policy import BlockManager, Sequence

BLOCK = 4


class BlockManagerMachine(RuleBasedStateMachine):
    """Sequences are admitted (taking prefix hits), grow by steps, and are freed. The
    reference model records, for every block whose KV was written, the whole token prefix it
    ends (the content that produced it)."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=BLOCK, enable_prefix_caching=True)
        self.live: list[Sequence] = []
        self.prefix_of: dict[int, tuple] = {}   # block -> tokens [0, end of block) of its writer
        self.next_id = 0

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=20), want=st.integers(1, 20))
    def admit(self, tokens, want):
        seq = Sequence(self.next_id, tokens, max_tokens=1)
        self.next_id += 1
        hits = self.bm.match_prefix(seq)
        assert len(hits) * BLOCK <= len(tokens) - 1, "a hit must leave the last token to compute"
        for i, block in enumerate(hits):   # a hit is only ever identical content
            assert self.prefix_of[block] == tuple(tokens[:(i + 1) * BLOCK])
        n = min(len(tokens), len(hits) * BLOCK + want)
        if not self.bm.can_admit(seq, hits, n):
            revived = sum(self.bm.ref_counts[b] == 0 for b in hits)
            assert revived + -(-n // BLOCK) - len(hits) > self.bm.num_free_blocks
            return
        self.bm.admit(seq, hits)
        assert self.bm.allocate(seq, n)
        self.live.append(seq)
        self.compute(seq, n)

    def compute(self, seq, upto):
        """The executor writes KV for tokens [computed, upto) and the step registers them."""
        for b in range(seq.num_computed_tokens // BLOCK, -(-upto // BLOCK)):
            end = min(upto, (b + 1) * BLOCK)
            if end == (b + 1) * BLOCK:
                self.prefix_of[seq.block_table[b]] = tuple(seq.token_ids[:end])
            else:   # a partial block: its content is not a cacheable prefix
                self.prefix_of.pop(seq.block_table[b], None)
        seq.num_computed_tokens = upto
        self.bm.register(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def grow(self, data, new):
        seq = data.draw(st.sampled_from(self.live))
        seq.token_ids.extend(new)
        seq.num_tokens = len(seq.token_ids)
        if self.bm.allocate(seq, seq.num_tokens):
            self.compute(seq, seq.num_tokens)
        else:
            assert self.bm.blocks_needed(seq, seq.num_tokens) > self.bm.num_free_blocks

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free_blocks(seq)
        assert seq.block_table == []

    @invariant()
    def ownership(self):
        self.bm.check_integrity()
        holders = [0] * self.bm.num_blocks
        for seq in self.live:
            for block in seq.block_table:
                holders[block] += 1
        assert holders == self.bm.ref_counts.tolist()
        held = {b for b in range(self.bm.num_blocks) if holders[b]}
        assert held.isdisjoint(self.bm.free_list())
        assert len(held) + self.bm.num_free_blocks == self.bm.num_blocks
        assert 0.0 <= self.bm.usage <= 1.0

    @invariant()
    def cached_blocks_hold_what_produced_them(self):
        by_content = {}
        cached = self.bm.cached
        for h, block in cached.items():
            content = self.prefix_of[block]   # only written full blocks are ever cached
            assert by_content.setdefault(content, h) == h, "one prefix, one hash"
        assert len(set(cached.values())) == len(cached), "one block, one content"

    def teardown(self):
        for seq in self.live:
            self.bm.free_blocks(seq)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.usage == 0.0
        self.bm.check_integrity()


TestBlockManager = BlockManagerMachine.TestCase


def computed(bm: BlockManager, seq_id, tokens, **kwargs) -> Sequence:
    """A sequence admitted (taking any hits), given blocks for its tokens, and run: its full
    blocks are registered, as after the step that computed them."""
    seq = Sequence(seq_id, tokens, 1, **kwargs)
    bm.admit(seq, bm.match_prefix(seq))
    assert bm.allocate(seq, len(tokens))
    seq.num_computed_tokens = len(tokens)
    bm.register(seq)
    return seq


def test_hit_never_covers_last_token():
    bm = BlockManager(8, 4)
    computed(bm, "a", list(range(8)))
    same = Sequence("b", list(range(8)), 1)
    assert len(bm.match_prefix(same)) == 1          # 2 full blocks cached, only 1 may hit
    longer = Sequence("c", list(range(9)), 1)
    assert len(bm.match_prefix(longer)) == 2


def test_freed_blocks_are_evicted_lru_tail_first():
    bm = BlockManager(4, 2)
    a = computed(bm, "a", [1, 2, 3, 4, 5])
    bm.free_blocks(a)
    assert len(bm.cached) == 2
    # Only the never-cached blocks and then a's tail may be reused first: its prefix block
    # (holding [1, 2]) survives two new allocations.
    b = Sequence("b", [9, 9, 9, 9], 1)
    bm.admit(b, [])
    bm.allocate(b, 4)
    assert a.block_table == [] and len(bm.cached) == 2
    c = Sequence("c", [7, 7], 1)
    bm.admit(c, [])
    bm.allocate(c, 2)                      # reuses a's last block: its tail evicted first
    assert bm.evictions == 1
    again = Sequence("d", [1, 2, 3], 1)
    assert len(bm.match_prefix(again)) == 1   # a's first block is still cached


def test_extra_keys_separate_equal_tokens():
    bm = BlockManager(8, 2)
    computed(bm, "a", [1, 2, 3], extra_keys=b"lora-1")
    assert bm.match_prefix(Sequence("b", [1, 2, 3], 1, extra_keys=b"lora-1"))
    assert not bm.match_prefix(Sequence("c", [1, 2, 3], 1, extra_keys=b"lora-2"))
    assert not bm.match_prefix(Sequence("d", [1, 2, 3], 1))


def test_disabled_cache_never_hits():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    computed(bm, "a", [1, 2, 3])
    assert bm.match_prefix(Sequence("b", [1, 2, 3], 1)) == [] and not bm.cached
    assert bm.count_cached_tokens([1, 2, 3]) == 0


def test_count_cached_tokens_matches_match_prefix():
    bm = BlockManager(8, 2)
    computed(bm, "a", [1, 2, 3, 4, 5])
    probe = [1, 2, 3, 4, 6, 7]
    assert bm.count_cached_tokens(probe) == 2 * len(bm.match_prefix(Sequence("p", probe, 1)))


def test_pool_must_have_a_block():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 13), st.booleans()), min_size=1, max_size=8),
       st.integers(0, 3))
def test_append_blocks_hands_out_what_allocate_would(prompts, rounds):
    """One call giving each sequence its next block = allocate one sequence after another:
    the same blocks, evictions and cache, from a pool with freed cached blocks in it."""
    pools = [BlockManager(num_blocks=40, block_size=BLOCK) for _ in range(2)]
    live = [[], []]
    for bm, seqs in zip(pools, live):
        bm.free_blocks(computed(bm, "filler", list(range(100, 100 + 40 * BLOCK))))  # all cached
        for i, (n, keep) in enumerate(prompts):
            seq = computed(bm, i, [i % 3] * n)
            if keep:
                seqs.append(seq)
            else:           # its cached blocks go back to the pool, to be evicted
                bm.free_blocks(seq)
    for _ in range(rounds):
        if len(live[0]) > pools[0].num_free_blocks:
            with pytest.raises(ValueError, match="free"):
                pools[0].append_blocks(live[0])
            break
        pools[0].append_blocks(live[0])
        for seq in live[1]:
            assert pools[1].allocate(seq, (len(seq.block_table) + 1) * BLOCK)
    assert [s.block_table for s in live[0]] == [s.block_table for s in live[1]]
    assert pools[0].evictions > 0
    assert pools[0].cached == pools[1].cached and pools[0].evictions == pools[1].evictions
    assert pools[0].free_list() == pools[1].free_list()
    pools[0].check_integrity()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "free"]), st.integers(0, 5), st.integers(1, 30)),
                max_size=60))
def test_free_list_keeps_lru_order_through_revivals(ops):
    """The free list hands blocks out in the order they were freed, minus those a prefix hit
    took back, across its moves to the front of its array (a small pool moves it often):
    the same order as a reference ordered-dict model."""
    import collections
    bm = BlockManager(num_blocks=24, block_size=BLOCK)
    ref = collections.OrderedDict.fromkeys(range(24))
    live = []
    for i, (op, prefix, n) in enumerate(ops):
        if op == "free" and live:
            seq = live.pop(prefix % len(live))
            for block in reversed(seq.block_table):
                if bm.ref_counts[block] == 1:
                    ref[block] = None
            bm.free_blocks(seq)
        elif op == "admit":
            seq = Sequence(i, [prefix] * n, 1)
            hits = bm.match_prefix(seq)
            if not bm.can_admit(seq, hits, n):
                continue
            for block in hits:
                ref.pop(block, None)
            bm.admit(seq, hits)
            table = len(seq.block_table)
            assert bm.allocate(seq, n)
            for block in seq.block_table[table:]:
                assert next(iter(ref)) == block
                del ref[block]
            seq.num_computed_tokens = n
            bm.register(seq)
            live.append(seq)
        assert bm.free_list() == list(ref)
        bm.check_integrity()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit"] * 3 + ["decode", "free", "free", "preempt", "probe"]),
                          st.integers(0, 40), st.lists(st.integers(0, 1), min_size=1, max_size=14),
                          st.integers(1, 12)),
                max_size=120))
def test_deferred_registration_changes_nothing(ops):
    """A pool that defers hashing (`defer_registration`, the default) and one that hashes and
    enters every block at once, driven alike (prompts admitted in chunks, decodes, frees,
    preemptions and re-admissions, router probes; chains shared or not, a pool small enough
    to evict): the same hits, blocks, evictions, cache content and free list after each op."""
    pools = [BlockManager(num_blocks=16, block_size=2), BlockManager(num_blocks=16, block_size=2)]
    pools[1].defer_registration = False
    live: list[tuple[Sequence, Sequence]] = []

    def step(pair, upto, token):
        """The step computing tokens [computed, upto) of both twins, if it gets its blocks;
        having computed all, it samples `token` (as the scheduler's update)."""
        if pools[0].blocks_needed(pair[0], upto) > pools[0].num_free_blocks:
            return False
        for bm, seq in zip(pools, pair):
            assert bm.allocate(seq, upto)
            seq.num_computed_tokens = upto
            bm.register(seq)
            if upto == seq.num_tokens:
                seq.token_ids.append(token)
                seq.num_tokens += 1
        return True

    def admit(pair, chunk):
        hits = [bm.match_prefix(seq) for bm, seq in zip(pools, pair)]
        assert hits[0] == hits[1]
        n = min(pair[0].num_tokens, len(hits[0]) * 2 + chunk)
        if not pools[0].can_admit(pair[0], hits[0], n):
            return False
        for bm, seq, h in zip(pools, pair, hits):
            bm.admit(seq, h)
        step(pair, n, 100 + pair[0].seq_id)
        step(pair, pair[0].num_tokens, 100 + pair[0].seq_id)   # the rest, as a later chunk
        return True

    for i, (op, first, tokens, k) in enumerate(ops):
        if op in ("admit", "probe"):
            prompt = [first] + tokens
            if op == "probe":
                counts = [bm.count_cached_tokens(prompt) for bm in pools]
                assert counts[0] == counts[1]
                continue
            pair = (Sequence(i, prompt, 1), Sequence(i, prompt, 1))
            if admit(pair, k):
                live.append(pair)
        elif live:
            pair = live[first % len(live)]
            if op == "decode":      # k steps: the rest of its prompt, then decodes
                for _ in range(k):
                    if not step(pair, pair[0].num_tokens, 100 + i):
                        break
            else:
                live.remove(pair)
                for bm, seq in zip(pools, pair):
                    bm.free_blocks(seq)
                    seq.num_computed_tokens = 0
                if op == "preempt" and admit(pair, k):   # recomputed: its own blocks may hit
                    live.append(pair)
        assert [[s.block_table for s in pair] for pair in live] == [[p[0].block_table] * 2 for p in live]
        assert pools[0].cached == pools[1].cached
        assert pools[0].stats == pools[1].stats
        assert pools[0].free_list() == pools[1].free_list()
        for bm in pools:
            bm.check_integrity()


def test_deferred_chains_are_forgotten_once_evicted():
    """Each owner's record of its deferred chain lives while the chain's first block is
    cached: a long run of distinct prompts through a small pool keeps the records bounded."""
    bm = BlockManager(num_blocks=4, block_size=2)
    for i in range(50):
        bm.free_blocks(computed(bm, i, [i, i, i, i, 0]))
        assert len(bm._deferred) <= 2 * bm.num_blocks + 1
        bm.check_integrity()
    assert bm.evictions > 0
