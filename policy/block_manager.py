"""Paged KV block pool with an xxhash prefix cache (vLLM V1 semantics).

A block holds `block_size` consecutive tokens of one sequence. Blocks are reference
counted: a prefix-cache hit shares a block between sequences. Only full blocks are
hashed, each hash chaining its parent's (so equal hashes mean equal whole prefixes), and a
block is registered in the cache only after the step that computed its KV has run.
Freed blocks keep their hash and stay reusable until they are handed out again, in LRU
order (a sequence frees its blocks tail first, so its prefix is evicted last).

The free list is a FIFO of block ids kept in a plain list read from a moving head, so that
freeing appends and allocating takes a slice: no per-block node (an OrderedDict's cost,
once the block manager's largest). A freed block that a prefix hit takes back leaves a
stale entry behind, skipped when the head reaches it (`_free_pos` says which entry of a
block is live).
"""
from array import array

import xxhash
from xxhash import xxh64_intdigest

from policy.sequence import Sequence

NO_HASH = -1
COMPACT_AFTER = 4096    # consumed free-list entries dropped from the front once past this


def chain_hashes(token_ids, block_size: int, num_blocks: int, parent: int, start: int = 0) -> list[int]:
    """Hashes of `num_blocks` consecutive full blocks of `token_ids` from token `start`,
    continuing the chain from `parent`: block hash = xxhash64 of the block's token ids
    (int64) seeded with its parent's hash, so equal hashes mean equal whole prefixes.
    An int64 `array("q")` is hashed in place; anything else is converted once."""
    if not (isinstance(token_ids, array) and token_ids.typecode == "q"):
        token_ids = array("q", token_ids[start:start + num_blocks * block_size])
        start = 0
    hashes = []
    with memoryview(token_ids) as view:   # released at once: a live view pins the array's size
        for i in range(start, start + num_blocks * block_size, block_size):
            parent = xxh64_intdigest(view[i:i + block_size], parent)
            hashes.append(parent)
    return hashes


def root_hash(extra_keys: bytes) -> int:
    """The parent of a sequence's first block: extra keys (LoRA id, cache salt...) enter the
    chain here, so they separate every block of the sequence."""
    return xxhash.xxh64_intdigest(extra_keys) if extra_keys else 0


class BlockManager:
    """Allocates blocks to sequences and keeps the prefix cache.

    Invariants (checked by `check_integrity`): every block is free xor held (ref count > 0);
    a hash in the cache maps to a block carrying that hash; free blocks are exactly those
    with ref count 0.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash = [NO_HASH] * num_blocks
        self.cached: dict[int, int] = {}       # block hash -> block id
        # Free blocks in eviction order (front = next to reuse): entries _queue[_head:],
        # the entry at absolute position p (= _base + list index) being live iff
        # _free_pos[its block] == p; _free_pos is -1 for a held block. _stale counts the
        # dead entries after the head (blocks revived by a prefix hit).
        self._queue: list[int] = list(range(num_blocks))
        self._head = self._base = self._stale = 0
        self._free_pos: list[int] = list(range(num_blocks))
        self.queries = 0        # prompt tokens looked up in the cache
        self.hits = 0           # of which served from it
        self.evictions = 0      # cached blocks overwritten by new content

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._queue) - self._head - self._stale

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - (len(self._queue) - self._head - self._stale)

    def free_list(self) -> list[int]:
        """The free blocks in eviction order (the next one handed out first)."""
        pos = self._free_pos
        return [b for p, b in enumerate(self._queue[self._head:], self._base + self._head) if pos[b] == p]

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
            block = self.cached.get(h)
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
            if h not in self.cached:
                break
            n += self.block_size
        return n

    # ---- changes -------------------------------------------------------------------
    def can_admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether `seq` can take the cached `hits` and get blocks for `num_tokens` tokens."""
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)
        new = max(0, -(-num_tokens // self.block_size) - len(hits))
        return revived + new <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give a sequence with no blocks the cached `hits` (its KV is then computed up to
        them) and count the lookup."""
        ref_counts, pos = self.ref_counts, self._free_pos
        for block in hits:
            if ref_counts[block] == 0:     # revived: its free-list entry goes stale
                pos[block] = -1
                self._stale += 1
            ref_counts[block] += 1
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
        if need > len(self._queue) - self._head - self._stale:
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
        queue, head = self._queue, self._head
        pos = self._free_pos
        if not self._stale:        # every entry live: one slice
            blocks = queue[head:head + n]
            head += n
        else:
            blocks, base = [], self._base
            while len(blocks) < n:
                block = queue[head]
                if pos[block] == base + head:
                    blocks.append(block)
                else:
                    self._stale -= 1
                head += 1
        if head > COMPACT_AFTER and 2 * head > len(queue):   # drop the consumed front now and then
            del queue[:head]
            self._base += head
            head = 0
        self._head = head
        block_hash, ref_counts, cached = self.block_hash, self.ref_counts, self.cached
        for block in blocks:
            ref_counts[block] = 1
            pos[block] = -1
            h = block_hash[block]
            if h != NO_HASH:     # evict: its old content is gone
                if cached.get(h) == block:
                    del cached[h]
                block_hash[block] = NO_HASH
                self.evictions += 1
        return blocks

    def register(self, seq: Sequence) -> None:
        """Enter the full blocks whose KV is now computed into the prefix cache."""
        full = seq.num_computed_tokens // self.block_size
        done = seq.num_registered_blocks
        if full <= done:
            return
        seq.num_registered_blocks = full
        if not self.enable_prefix_caching:
            return
        cached, block_hash, table = self.cached, self.block_hash, seq.block_table
        hashes = seq.block_hashes
        if full == done + 1 and len(hashes) == done:   # a decode step filled one block
            bs = self.block_size
            h = xxh64_intdigest(seq.token_ids[done * bs:full * bs],
                                hashes[-1] if done else root_hash(seq.extra_keys))
            hashes.append(h)
            if h not in cached:
                block = table[done]
                cached[h] = block
                block_hash[block] = h
            return
        hashes = self.block_hashes(seq, full)
        for i in range(done, full):
            h = hashes[i]
            if h not in cached:   # an identical block elsewhere keeps serving hits
                block = table[i]
                cached[h] = block
                block_hash[block] = h

    def free_blocks(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, tail first; cached ones stay findable until reused."""
        ref_counts, pos, queue = self.ref_counts, self._free_pos, self._queue
        end = self._base + len(queue)
        for block in reversed(seq.block_table):
            left = ref_counts[block] - 1
            ref_counts[block] = left
            if not left:
                pos[block] = end
                end += 1
                queue.append(block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def check_integrity(self) -> None:
        """Assert the pool's invariants (tests and debugging; O(num_blocks))."""
        free = self.free_list()
        assert len(free) == len(set(free)) == self.num_free_blocks
        free = set(free)
        for block in range(self.num_blocks):
            assert (self.ref_counts[block] == 0) == (block in free), block
            assert self.ref_counts[block] >= 0, block
            assert (self._free_pos[block] >= 0) == (block in free), block
        for h, block in self.cached.items():
            assert self.block_hash[block] == h, (h, block)
