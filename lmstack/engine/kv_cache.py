"""Paged KV-cache bookkeeping: which fixed-size blocks each sequence owns, plus prefix caching.

Only ids and reference counts live here; the K/V tensors are indexed by the flat slot numbers
this module hands out (`slot`, `slot_mapping`).

Prefix caching: every completely computed block is named by a hash of its tokens chained with
the hash of the block before it, so equal hashes mean equal prefixes and a new request whose
prompt starts with a cached prefix can reuse those blocks instead of recomputing them. A freed
block keeps its hash (it stays reusable) until a fresh block is needed and nothing unhashed is
free; then the least recently freed hashed block is evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from lmstack.engine.sequence import Sequence

BlockHash = bytes


def chain_hash(prev: BlockHash | None, token_ids: list[int]) -> BlockHash:
    """Hash of one full block given the hash of the block before it (None for the first).

    A cryptographic digest rather than Python's hash(): hash() of ints is trivially
    invertible, so a crafted prompt could collide with another user's prefix and be served
    their K/V. 16 bytes of blake2b costs about a microsecond per block.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(prev if prev is not None else b"\x00" * 16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: BlockHash | None = None  # set only while hash_to_block_id[hash] == block_id


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[BlockHash, int] = {}
        # Free blocks come in two kinds: never used / unhashed ones, handed out first, and
        # cached ones (ref 0 but still holding a reusable prefix), evicted oldest first.
        self._free_unhashed: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # In tokens, as vLLM reports them.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- accounting -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_unhashed) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one sequence."""
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        if self.prefix_cache_queries == 0:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -------------------------------------------------------------------------

    def allocate_prefix(self, seq: Sequence) -> int:
        """Attach the longest cached prefix of seq's tokens; return how many tokens it covers."""
        assert not seq.block_table and seq.num_computed_tokens == 0, "prefix of a fresh seq only"
        hashes: list[BlockHash] = []
        hits = 0
        if self.enable_prefix_caching:
            # The block holding the last token is never reused: the model must still run at
            # least that token to produce logits for the next one.
            num_lookup = (len(seq) - 1) // self.block_size
            self.prefix_cache_queries += num_lookup * self.block_size
            prev = None
            for i in range(num_lookup):
                start = i * self.block_size
                prev = chain_hash(prev, seq.token_ids[start : start + self.block_size])
                hashes.append(prev)
                if hits == i:  # still on the consecutive run of hits
                    block_id = self.hash_to_block_id.get(prev)
                    if block_id is None:
                        # Later blocks cannot hit (their chain includes this miss), but their
                        # hashes are kept so cache_full_blocks need not recompute them.
                        continue
                    self._ref(block_id)
                    seq.block_table.append(block_id)
                    hits += 1
            self.prefix_cache_hits += hits * self.block_size
        seq.block_hashes = hashes
        seq.hashed_blocks = hits
        seq.num_computed_tokens = seq.num_cached_tokens = hits * self.block_size
        return hits * self.block_size

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._evictable.pop(block_id)
        block.ref_count += 1

    def _new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._new_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq.block_table to hold num_new_tokens more tokens; all or nothing."""
        needed = self._new_blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_fresh_block())
        return True

    def _take_fresh_block(self) -> int:
        if self._free_unhashed:
            block_id = self._free_unhashed.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self.hash_to_block_id[block.hash]
            block.hash = None
        block = self.blocks[block_id]
        assert block.ref_count == 0 and block.hash is None
        block.ref_count = 1
        return block_id

    # ---- addressing -------------------------------------------------------------------------

    def slot(self, seq: Sequence, position: int) -> int:
        block_id = seq.block_table[position // self.block_size]
        return block_id * self.block_size + position % self.block_size

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat cache slots for token positions [start, end)."""
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    # ---- caching and release ----------------------------------------------------------------

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish every block of seq that is now completely computed under its prefix hash."""
        if not self.enable_prefix_caching:
            return
        hashes: list[BlockHash] = seq.block_hashes
        done: int = seq.hashed_blocks
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(done, full):
            if i < len(hashes):
                block_hash = hashes[i]
            else:
                start = i * self.block_size
                prev = hashes[i - 1] if i else None
                block_hash = chain_hash(prev, seq.token_ids[start : start + self.block_size])
                hashes.append(block_hash)
            block = self.blocks[seq.block_table[i]]
            # Another block may already hold the same prefix (two identical prompts computed
            # in the same step); the first one stays the cached copy and this one stays
            # private, to be recycled without eviction when freed.
            if block.hash is None and block_hash not in self.hash_to_block_id:
                block.hash = block_hash
                self.hash_to_block_id[block_hash] = block.block_id
        seq.hashed_blocks = max(done, full)

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; its K/V must be recomputed (or re-hit) if it runs again."""
        # Release from the tail so a prefix's later blocks are evicted before its first ones:
        # the head of a prompt (system prompt, shared instructions) is the part most reused.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free_unhashed.append(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.block_hashes = []
        seq.hashed_blocks = 0

    def check_invariants(self) -> None:
        """Raise AssertionError if the free lists, ref counts and hash map disagree (tests)."""
        free_ids = list(self._free_unhashed) + list(self._evictable)
        free_set = set(free_ids)
        assert len(free_ids) == len(free_set), "a block is on a free list twice"
        for block in self.blocks:
            assert block.ref_count >= 0
            is_free = block.block_id in free_set
            assert is_free == (block.ref_count == 0), f"block {block.block_id} free-list mismatch"
            if block.hash is not None:
                assert self.hash_to_block_id.get(block.hash) == block.block_id
            if block.block_id in self._evictable:
                assert block.hash is not None
        for block_hash, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == block_hash
