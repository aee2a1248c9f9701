"""Paged KV block pool with an xxhash prefix cache (vLLM V1 semantics).

A block holds `block_size` consecutive tokens of one sequence. Blocks are reference
counted: a prefix-cache hit shares a block between sequences. Only full blocks are
hashed, each hash chaining its parent's (so equal hashes mean equal whole prefixes), and a
block is registered in the cache only after the step that computed its KV has run.
Freed blocks keep their hash and stay reusable until they are handed out again, in LRU
order (a sequence frees its blocks tail first, so its prefix is evicted last).

Per-block state is in numpy arrays: a request's blocks are handed out, evicted and freed
in a few array operations, not a Python step each. The free list is a FIFO of block ids
read from a moving head (freeing appends, allocating takes a slice); a freed block that a
prefix hit takes back leaves a dead entry, dropped in one pass before the next allocation.
Evicting a block only resets its `cache_state`: its dict entry dies with it (`lookup`
checks) and dead entries are dropped in bulk (the dict rebuilt from the entered blocks)
when they outnumber the pool.

Deferred registration. Hashing every full block and entering it in the dict costs more
than the rest of a simulated request's bookkeeping, and in most traces almost no block is
ever found. A lookup walks a chain from its first block, so a chain whose first block no
lookup found cannot have been hit. Hence the first full block of every sequence is hashed
and entered at once, and its later blocks are only marked DEFERRED (no hash computed) while
that first block's chain has one writer, the *owner*, and no lookup found it. The first
lookup that finds the first block, or a second sequence registering the same first block,
hashes and enters the owner's deferred blocks; from then on that chain is *shared*: every
sequence starting with that first block registers its blocks at once. Nothing observable
changes (the tests run both ways, `defer_registration`): no other sequence holds a block
of a chain no lookup found, so the owner frees its deferred blocks itself, in one call,
tail first: they come before its first block in the free list, so once the first block is
evicted, so is every deferred block.
(Equal hashes are taken for equal prefixes throughout, as the eager cache does; deferral
adds no other assumption.)
"""
from array import array

import numpy as np
import xxhash
from xxhash import xxh64_intdigest

from policy.sequence import Sequence

# A block's cache_state. ENTERED: its hash (block_hash) is in the cache dict. DEFERRED:
# registered, not hashed yet; block_hash holds its chain's first hash (whose owner it is).
NONE, ENTERED, DEFERRED = 0, 1, 2


def chain_hashes(token_ids, block_size: int, num_blocks: int, parent: int) -> list[int]:
    """Hashes of the first `num_blocks` full blocks of `token_ids`, continuing the chain
    from `parent`: block hash = xxhash64 of the block's token ids (int64) seeded with its
    parent's hash, so equal hashes mean equal whole prefixes. An int64 `array("q")` is
    hashed in place; anything else is converted once."""
    if not (isinstance(token_ids, array) and token_ids.typecode == "q"):
        token_ids = array("q", token_ids[:num_blocks * block_size])
    hashes = []
    append, digest = hashes.append, xxh64_intdigest
    with memoryview(token_ids) as view:   # released at once: a live view pins the array's size
        for i in range(0, num_blocks * block_size, block_size):
            parent = digest(view[i:i + block_size], parent)
            append(parent)
    return hashes


def root_hash(extra_keys: bytes) -> int:
    """The parent of a sequence's first block: extra keys (LoRA id, cache salt...) enter the
    chain here, so they separate every block of the sequence."""
    return xxhash.xxh64_intdigest(extra_keys) if extra_keys else 0


class BlockManager:
    """Allocates blocks to sequences and keeps the prefix cache.

    Invariants (checked by `check_integrity`): every block is free xor held (ref count > 0);
    a hash in the cache dict maps to an ENTERED block carrying that hash, and an ENTERED
    block is its hash's entry; free blocks are exactly those with ref count 0; the DEFERRED
    blocks of a chain are the leading blocks (after the first) of its owner's block table.
    """

    # False: every full block hashed and entered when registered (the reference behaviour
    # deferral reproduces; tests set it per pool).
    defer_registration = True

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = np.zeros(num_blocks, np.int64)
        self.cache_state = np.zeros(num_blocks, np.uint8)   # NONE / ENTERED / DEFERRED
        self.block_hash = np.zeros(num_blocks, np.uint64)   # its hash (ENTERED), its chain's (DEFERRED)
        # block hash -> block id. An entry is live while its block carries its hash
        # (`lookup`); evicting a block only resets its state, so that handing out blocks
        # touches no dict entry; past 4 x the pool, the dict is rebuilt from the entered blocks.
        self._cache: dict[int, int] = {}
        # Chains registered deferred: first block's hash -> (owner, the owner's block table
        # then: a freed owner's table keeps its blocks for `_enter_deferred`).
        self._deferred: dict[int, tuple[Sequence, list[int]]] = {}
        self._shared: set[int] = set()      # first hashes of chains registered at once
        # Sequences whose token_ids lag behind their computed tokens: seq -> (n, token),
        # token_ids[n:] to be read as `token` repeated (set by an event-skipping stretch,
        # which writes its decoding sequences' tokens only at its end).
        self.lagging: dict[Sequence, tuple[int, int]] = {}
        # Free blocks in eviction order (front = next to reuse): _queue[_head:_tail]. The
        # entry at position p is live iff _free_pos[its block] == p (-1: held); _stale
        # counts the dead ones (blocks a prefix hit took back), dropped before a take.
        self._queue = np.zeros(2 * num_blocks, np.int64)
        self._queue[:num_blocks] = np.arange(num_blocks)
        self._free_pos = np.arange(num_blocks, dtype=np.int64)
        self._head, self._tail, self._stale = 0, num_blocks, 0
        self.queries = 0        # prompt tokens looked up in the cache
        self.hits = 0           # of which served from it
        self.evictions = 0      # cached blocks overwritten by new content

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self._tail - self._head - self._stale

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - (self._tail - self._head - self._stale)

    def free_list(self) -> list[int]:
        """The free blocks in eviction order (the next one handed out first)."""
        head, tail = self._head, self._tail
        entries = self._queue[head:tail]
        return entries[self._free_pos[entries] == np.arange(head, tail)].tolist()

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def stats(self) -> dict:
        return {"queries": self.queries, "hits": self.hits, "evictions": self.evictions,
                "hit_rate": self.hits / self.queries if self.queries else 0.0,
                "usage": self.usage}

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that its first `num_tokens` tokens have a slot."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Hashes of the first `num_blocks` full blocks of `seq`, computed once and kept."""
        hashes = seq.block_hashes
        done = len(hashes)
        if done < num_blocks:
            bs = self.block_size
            hashes += chain_hashes(self._tokens(seq, done * bs, num_blocks * bs), bs, num_blocks - done,
                                   hashes[-1] if done else root_hash(seq.extra_keys))
        return hashes

    def _tokens(self, seq: Sequence, start: int, end: int) -> array:
        """Tokens [start, end) of `seq`, including those an event-skipping stretch has not
        written yet (`lagging`)."""
        lag = self.lagging.get(seq) if self.lagging else None
        if lag is None or end <= lag[0]:
            return seq.token_ids[start:end]
        n, token = lag
        if start >= n:
            return array("q", (token,)) * (end - start)
        return seq.token_ids[start:n] + array("q", (token,)) * (end - n)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering the longest cached prefix of `seq`. Never covers the last
        token: its logits must be computed."""
        if not self.enable_prefix_caching:
            return []
        num_blocks = (seq.num_tokens - 1) // self.block_size
        # Most prompts miss at their first block: hash the rest only after a hit.
        if not num_blocks or self.lookup(self.block_hashes(seq, 1)[0]) is None:
            return []
        hits = []
        cache, state, block_hash = self._cache, self.cache_state, self.block_hash
        # `lookup`, inlined (the chain's deferred blocks are entered now)
        for h in self.block_hashes(seq, num_blocks)[:num_blocks]:
            block = cache.get(h)
            if block is None or state[block] != ENTERED or block_hash[block] != h:
                break
            hits.append(block)
        return hits

    def count_cached_tokens(self, token_ids, extra_keys: bytes = b"") -> int:
        """Tokens of a prompt the cache would serve now (for routers; changes nothing
        observable)."""
        if not self.enable_prefix_caching:
            return 0
        bs, num_blocks = self.block_size, (len(token_ids) - 1) // self.block_size
        if not num_blocks or self.lookup(chain_hashes(token_ids, bs, 1, root_hash(extra_keys))[0]) is None:
            return 0
        n = 0
        for h in chain_hashes(token_ids, bs, num_blocks, root_hash(extra_keys)):
            if self.lookup(h) is None:
                break
            n += bs
        return n

    def lookup(self, h: int) -> int | None:
        """The cached block holding the content with hash `h`, or None. Chains are looked
        up from their first block (a lookup finding a chain's first block enters the
        chain's deferred blocks)."""
        if not self._live(h):
            return None
        if h in self._deferred:
            self._enter_deferred(h)
        return self._cache[h]

    def _live(self, h: int) -> bool:
        """Whether the cache entry of hash `h` exists and its block still carries it."""
        block = self._cache.get(h)
        return block is not None and self.cache_state[block] == ENTERED and self.block_hash[block] == h

    # ---- changes -------------------------------------------------------------------
    def can_admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether `seq` can take the cached `hits` and get blocks for `num_tokens` tokens."""
        revived = int(np.count_nonzero(self.ref_counts[hits] == 0)) if hits else 0
        new = max(0, -(-num_tokens // self.block_size) - len(hits))
        return revived + new <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give a sequence with no blocks the cached `hits` (its KV is then computed up to
        them) and count the lookup."""
        if hits:
            blocks = np.array(hits)
            revived = blocks[self.ref_counts[blocks] == 0]   # their free-list entries go stale
            self._free_pos[revived] = -1
            self._stale += len(revived)
            self.ref_counts[blocks] += 1
        seq.block_table.extend(hits)
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.queries += seq.num_tokens
            self.hits += seq.num_cached_tokens

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure `seq` has slots for its first `num_tokens` tokens. False (and nothing
        changed) if the pool has too few free blocks."""
        table = seq.block_table
        need = -(-num_tokens // self.block_size) - len(table)
        if need <= 0:
            return True
        if need > self._tail - self._head - self._stale:
            return False
        table += self.take(need)
        return True

    def append_blocks(self, seqs) -> None:
        """Give each of `seqs` one more block, in order: a decode step's allocations in one
        call, the same blocks as `allocate` one sequence after another. ValueError if the
        pool has fewer free blocks than `seqs` (nothing changed then)."""
        if len(seqs) > self.num_free_blocks:
            raise ValueError(f"{len(seqs)} blocks asked of a pool with {self.num_free_blocks} free")
        for seq, block in zip(seqs, self.take(len(seqs))):
            seq.block_table.append(block)

    def take(self, n: int) -> list[int]:
        """Hand out the first `n` free blocks, in order (the caller checked that there are
        n): ref count 1, old content (entered or deferred) evicted from the prefix cache."""
        if self._stale:
            self._drop_stale()
        head = self._head
        self._head = head + n
        if n <= 4:      # a decode step's few blocks: scalar work beats array calls
            blocks = [self._queue.item(head)] if n == 1 else self._queue[head:head + n].tolist()
            ref_counts, pos, state = self.ref_counts, self._free_pos, self.cache_state
            for block in blocks:
                ref_counts[block] = 1
                pos[block] = -1
                if state[block]:     # evict: its old content is gone
                    state[block] = NONE
                    self.evictions += 1
            return blocks
        blocks = self._queue[head:head + n]
        self.ref_counts[blocks] = 1
        self._free_pos[blocks] = -1
        evicted = int(np.count_nonzero(self.cache_state[blocks]))
        if evicted:         # their old content is gone
            self.cache_state[blocks] = NONE
            self.evictions += evicted
        return blocks.tolist()

    def _drop_stale(self) -> None:
        """Remove the dead entries from the free list (one array pass)."""
        head, tail = self._head, self._tail
        entries = self._queue[head:tail]
        live = entries[self._free_pos[entries] == np.arange(head, tail)]
        self._queue[head:head + len(live)] = live
        self._free_pos[live] = np.arange(head, head + len(live))
        self._tail, self._stale = head + len(live), 0

    def register(self, seq: Sequence) -> None:
        """Enter the full blocks whose KV is now computed into the prefix cache."""
        self.register_blocks(seq, seq.num_computed_tokens // self.block_size)

    def register_blocks(self, seq: Sequence, full: int) -> None:
        """Enter the first `full` blocks of `seq` (their KV computed) into the prefix cache:
        the first one at once, the others deferred while `seq` owns its chain."""
        done = seq.num_registered_blocks
        if full <= done:
            return
        seq.num_registered_blocks = full
        if not self.enable_prefix_caching:
            return
        table = seq.block_table
        if done == 0:
            owner = self._register_first(seq)
            done = 1
            if full == 1:
                return
        else:
            record = self._deferred.get(seq.block_hashes[0])
            owner = record is not None and record[1] is table
        if owner:
            first = seq.block_hashes[0]
            if full == done + 1:    # a decode step filled one block
                block = table[done]
                self.cache_state[block] = DEFERRED
                self.block_hash[block] = first
            else:
                blocks = np.array(table[done:full])
                self.cache_state[blocks] = DEFERRED
                self.block_hash[blocks] = first
            return
        hashes = seq.block_hashes
        if full == done + 1 and len(hashes) == done:    # a decode step filled one block
            h = xxh64_intdigest(self._tokens(seq, done * self.block_size, full * self.block_size), hashes[-1])
            hashes.append(h)
            self._enter_one(h, table[done])
        else:
            self._enter(self.block_hashes(seq, full)[done:full], table[done:full])

    def _register_first(self, seq: Sequence) -> bool:
        """Enter the first block of `seq` (unless an identical live block serves it). True
        if `seq` now owns its chain (its other blocks to be deferred): deferral is on, no
        live block serves this first block and no sequence shared the chain."""
        h = self.block_hashes(seq, 1)[0]
        block = seq.block_table[0]
        if not self.defer_registration or h in self._shared or self.lookup(h) is not None:
            # Registered at once: deferral off, a shared chain, or a second writer of a live
            # one (the lookup entered the owner's deferred blocks and shared the chain).
            self._enter_one(h, block)
            return False
        # A new chain, or one whose first block was evicted: every deferred block of its
        # last owner went before it, so `seq` owns it now.
        self._deferred[h] = (seq, seq.block_table)
        self._cache[h] = block
        self.block_hash[block] = h
        self.cache_state[block] = ENTERED
        if len(self._deferred) > 2 * self.num_blocks:   # at most one live chain per block
            self._drop_dead_chains()
        return True

    def _enter_one(self, h: int, block: int) -> None:
        """Enter `block`, just filled with the content of hash `h`, in the cache, unless an
        identical live block already serves that content."""
        if not self._live(h):
            self._cache[h] = block
            self.block_hash[block] = h
            self.cache_state[block] = ENTERED
            if len(self._cache) > 4 * self.num_blocks:
                self._cache = self._entered()

    def _enter(self, hashes: list[int], blocks: list[int]) -> None:
        """`_enter_one` of each of `blocks`, in bulk."""
        cache, block_hash, state = self._cache, self.block_hash, self.cache_state
        if cache.keys().isdisjoint(hashes):   # all new content: in bulk, in C
            cache.update(zip(hashes, blocks))
        else:
            new_blocks, new_hashes = [], []
            for h, block in zip(hashes, blocks):
                old = cache.get(h)
                if old is None or not (state[old] == ENTERED and block_hash[old] == h):
                    cache[h] = block   # (else an identical block elsewhere keeps serving hits)
                    new_blocks.append(block)
                    new_hashes.append(h)
            hashes, blocks = new_hashes, new_blocks
        if blocks:
            blocks = np.array(blocks)
            block_hash[blocks] = np.fromiter(hashes, np.uint64, len(hashes))
            state[blocks] = ENTERED
        if len(cache) > 4 * self.num_blocks:
            self._cache = self._entered()

    def _deferred_entries(self, first: int) -> tuple[list[int], list[int]]:
        """(hashes, blocks) of the deferred blocks of the chain starting with hash `first`:
        the leading blocks after the first of its owner's table still DEFERRED for it (its
        later ones were evicted first)."""
        owner, table = self._deferred[first]
        state, tags = self.cache_state, self.block_hash
        m = 1
        while m < len(table) and state[table[m]] == DEFERRED and tags[table[m]] == first:
            m += 1
        if m == 1:
            return [], []
        bs = self.block_size
        return chain_hashes(self._tokens(owner, bs, m * bs), bs, m - 1, first), table[1:m]

    def _enter_deferred(self, first: int) -> None:
        """A lookup found the first block of a deferred chain: hash and enter its deferred
        blocks; from now on the chain is shared (registered at once)."""
        hashes, blocks = self._deferred_entries(first)
        del self._deferred[first]
        self._shared.add(first)
        for h, block in zip(hashes, blocks):    # new content: the owner was its only writer
            self._cache[h] = block
            self.block_hash[block] = h
            self.cache_state[block] = ENTERED

    def _drop_dead_chains(self) -> None:
        """Forget the deferred chains whose first block was evicted (their deferred blocks
        went before it)."""
        self._deferred = {h: record for h, record in self._deferred.items() if self._live(h)}

    def _entered(self) -> dict[int, int]:
        """The cache dict without dead entries, built from the ENTERED blocks (O(pool))."""
        blocks = np.flatnonzero(self.cache_state == ENTERED)
        return dict(zip(self.block_hash[blocks].tolist(), blocks.tolist()))

    @property
    def cached(self) -> dict[int, int]:
        """The prefix cache, block hash -> block id: every block a lookup can find, deferred
        ones included (a new dict, O(pool); changes nothing)."""
        cached = self._entered()
        for first in self._deferred:
            if first in cached:
                cached.update(zip(*self._deferred_entries(first)))
        return cached

    def free_blocks(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, tail first; cached ones stay findable until reused."""
        table = seq.block_table
        seq.block_table = []    # a new list: a deferred chain's record keeps the old one
        seq.num_registered_blocks = 0
        if not table:
            return
        blocks = np.array(table[::-1])
        left = self.ref_counts[blocks] - 1
        self.ref_counts[blocks] = left
        freed = blocks[left == 0]
        tail = self._tail
        if tail + len(freed) > len(self._queue):    # move the free list to the front
            self._drop_stale()
            head, tail = self._head, self._tail
            tail -= head
            self._queue[:tail] = self._queue[head:head + tail].copy()
            self._free_pos[self._queue[:tail]] = np.arange(tail)
            self._head = 0
        self._queue[tail:tail + len(freed)] = freed
        self._free_pos[freed] = np.arange(tail, tail + len(freed))
        self._tail = tail + len(freed)

    def check_integrity(self) -> None:
        """Assert the pool's invariants (tests and debugging; O(num_blocks))."""
        free = self.free_list()
        assert len(free) == len(set(free)) == self.num_free_blocks
        free = set(free)
        for block in range(self.num_blocks):
            assert (self.ref_counts[block] == 0) == (block in free), block
            assert self.ref_counts[block] >= 0, block
            assert (self._free_pos[block] >= 0) == (block in free), block
        state = self.cache_state
        for block in np.flatnonzero(state == ENTERED).tolist():   # an entered block is its hash's entry
            assert self._cache.get(self.block_hash.item(block)) == block, block
        deferred = set()
        for first in self._deferred:
            assert first not in self._shared
            blocks = self._deferred_entries(first)[1]
            assert not blocks or self._live(first), "a deferred block outlived its chain's first"
            deferred.update(blocks)
        assert deferred == set(np.flatnonzero(state == DEFERRED).tolist()), "a deferred block no chain owns"
