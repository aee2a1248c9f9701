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
Evicting a block only clears its `hashed` flag: its dict entry dies with it (`lookup`
checks) and dead entries are dropped in bulk (the dict rebuilt from the blocks that carry a
hash) when they outnumber the pool.
"""
from array import array

import numpy as np
import xxhash
from xxhash import xxh64_intdigest

from policy.sequence import Sequence


def chain_hashes(token_ids, block_size: int, num_blocks: int, parent: int, start: int = 0) -> list[int]:
    """Hashes of `num_blocks` consecutive full blocks of `token_ids` from token `start`,
    continuing the chain from `parent`: block hash = xxhash64 of the block's token ids
    (int64) seeded with its parent's hash, so equal hashes mean equal whole prefixes.
    An int64 `array("q")` is hashed in place; anything else is converted once."""
    if not (isinstance(token_ids, array) and token_ids.typecode == "q"):
        token_ids = array("q", token_ids[start:start + num_blocks * block_size])
        start = 0
    hashes = []
    append, digest = hashes.append, xxh64_intdigest
    with memoryview(token_ids) as view:   # released at once: a live view pins the array's size
        for i in range(start, start + num_blocks * block_size, block_size):
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
    a hash in the cache (`cached`) maps to a block carrying that hash, and a block carrying
    a hash is that hash's entry; free blocks are exactly those with ref count 0.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = np.zeros(num_blocks, np.int64)
        self.block_hash = np.zeros(num_blocks, np.uint64)   # its hash, where `hashed`
        self.hashed = np.zeros(num_blocks, np.bool_)
        # block hash -> block id. An entry is live while its block carries its hash
        # (`lookup`); evicting a block only clears `hashed`, so that handing out blocks
        # touches no dict entry; past 4 x the pool, the dict is rebuilt from the hashed blocks.
        self._cache: dict[int, int] = {}
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
            hashes += chain_hashes(seq.token_ids, bs, num_blocks - done,
                                   hashes[-1] if done else root_hash(seq.extra_keys), done * bs)
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering the longest cached prefix of `seq`. Never covers the last
        token: its logits must be computed."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self.block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def count_cached_tokens(self, token_ids, extra_keys: bytes = b"") -> int:
        """Tokens of a prompt the cache would serve now (for routers; changes nothing)."""
        if not self.enable_prefix_caching:
            return 0
        n = 0
        for h in chain_hashes(token_ids, self.block_size, (len(token_ids) - 1) // self.block_size,
                              root_hash(extra_keys)):
            if self.lookup(h) is None:
                break
            n += self.block_size
        return n

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
        n): ref count 1, old content evicted from the prefix cache."""
        if self._stale:
            self._drop_stale()
        head = self._head
        self._head = head + n
        if n <= 4:      # a decode step's few blocks: scalar work beats array calls
            blocks = [self._queue.item(head)] if n == 1 else self._queue[head:head + n].tolist()
            ref_counts, pos, hashed = self.ref_counts, self._free_pos, self.hashed
            for block in blocks:
                ref_counts[block] = 1
                pos[block] = -1
                if hashed[block]:     # evict: its old content is gone
                    hashed[block] = False
                    self.evictions += 1
            return blocks
        blocks = self._queue[head:head + n]
        self.ref_counts[blocks] = 1
        self._free_pos[blocks] = -1
        evicted = int(np.count_nonzero(self.hashed[blocks]))
        if evicted:         # their old content is gone
            self.hashed[blocks] = False
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
        full = seq.num_computed_tokens // self.block_size
        done = seq.num_registered_blocks
        if full <= done:
            return
        seq.num_registered_blocks = full
        if not self.enable_prefix_caching:
            return
        table, hashes = seq.block_table, seq.block_hashes
        if full == done + 1 and len(hashes) == done:   # a decode step filled one block
            bs = self.block_size
            h = xxh64_intdigest(seq.token_ids[done * bs:full * bs],
                                hashes[-1] if done else root_hash(seq.extra_keys))
            hashes.append(h)
            old = self._cache.get(h)
            if old is None or not (self.hashed[old] and self.block_hash[old] == h):
                self._cache[h] = block = table[done]    # as cache_block, inlined
                self.block_hash[block] = h
                self.hashed[block] = True
                if len(self._cache) > 4 * self.num_blocks:
                    self._drop_dead_entries()
            return
        hashes = self.block_hashes(seq, full)[done:full]
        blocks = table[done:full]
        cache, block_hash, hashed = self._cache, self.block_hash, self.hashed
        if cache.keys().isdisjoint(hashes):   # all new content: in bulk, in C
            cache.update(zip(hashes, blocks))
        else:
            new_blocks, new_hashes = [], []
            for h, block in zip(hashes, blocks):
                old = cache.get(h)
                if old is None or not (hashed[old] and block_hash[old] == h):
                    cache[h] = block   # (else an identical block elsewhere keeps serving hits)
                    new_blocks.append(block)
                    new_hashes.append(h)
            hashes, blocks = new_hashes, new_blocks
        if blocks:
            blocks = np.array(blocks)
            block_hash[blocks] = np.fromiter(hashes, np.uint64, len(hashes))
            hashed[blocks] = True
            if len(cache) > 4 * self.num_blocks:
                self._drop_dead_entries()

    def lookup(self, h: int) -> int | None:
        """The cached block holding the content with hash `h`, or None."""
        block = self._cache.get(h)
        if block is None or not self.hashed[block] or self.block_hash[block] != h:
            return None
        return block

    def cache_block(self, h: int, block: int) -> None:
        """Enter `block`, just filled with the content of hash `h`, in the prefix cache,
        unless an identical block already serves that content."""
        cache = self._cache
        old = cache.get(h)
        if old is not None and self.hashed[old] and self.block_hash[old] == h:
            return
        cache[h] = block
        self.block_hash[block] = h
        self.hashed[block] = True
        if len(cache) > 4 * self.num_blocks:
            self._drop_dead_entries()

    def _drop_dead_entries(self) -> None:
        self._cache = self.cached

    @property
    def cached(self) -> dict[int, int]:
        """The prefix cache, block hash -> block id (a new dict, built from the blocks
        that carry a hash: each is its hash's live entry; O(pool))."""
        blocks = np.flatnonzero(self.hashed)
        return dict(zip(self.block_hash[blocks].tolist(), blocks.tolist()))

    def free_blocks(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, tail first; cached ones stay findable until reused."""
        table = seq.block_table
        seq.block_table = []
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
        for block in np.flatnonzero(self.hashed).tolist():   # a hashed block is its hash's entry
            assert self._cache.get(self.block_hash.item(block)) == block, block
