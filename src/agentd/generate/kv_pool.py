"""TokenBlockPool: the KV cache as a preallocated pool of fixed-size blocks.

Keys and values for every layer live in two arrays allocated once at start. A sequence
borrows the blocks it will need when it joins and returns them when it ends (or its client
goes away), so a decode step writes one token's keys and values in place and allocates
nothing. The model sees them as [heads, layers * blocks, block_size, head_dim] and reads
a sequence's tokens through its row of block ids (paged attention, as in vLLM).

Prefix caching (``prefix_cache=True``): a block full of prompt tokens is *published* under
a key that chains its tokens to the key of the block before it (equal keys: equal prefixes
from position 0). A later sequence whose prompt starts with published blocks takes them
(:meth:`TokenBlockPool.borrow_prefix`, one reference each) instead of computing them again.
A block whose last reference goes back stays cached, counted as free: :meth:`borrow`
evicts such blocks, least recently used first, only when no never-used block is left.
Only full prompt blocks are published, so a block a sequence still writes into (its last
prompt block, its decode tokens) is never shared.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PoolStats", "TokenBlockPool", "prefix_keys"]


def prefix_keys(prompt: np.ndarray, block_size: int, count: int) -> list[bytes]:
    """The chained keys of the first ``count`` full blocks of ``prompt`` (int64 token ids):
    block i's key hashes block i-1's key and block i's tokens, so it names the whole prefix
    up to the end of block i. 128-bit BLAKE2b: a collision (a wrong prefix served) is not a
    practical risk, unlike a 64-bit ``hash()``."""
    tokens = np.ascontiguousarray(prompt, dtype=np.int64)
    keys: list[bytes] = []
    key = b""
    for i in range(count):
        chunk = tokens[i * block_size : (i + 1) * block_size].tobytes()
        key = hashlib.blake2b(key + chunk, digest_size=16).digest()
        keys.append(key)
    return keys


@dataclass(frozen=True, slots=True)
class PoolStats:
    total: int
    free: int
    used: int
    peak_used: int
    block_size: int
    bytes: int
    cached: int = 0  # blocks published under a prefix key (in use or free)
    allocated: int = 0  # blocks handed out fresh (not from the prefix cache), ever


class TokenBlockPool:
    def __init__(
        self,
        *,
        layers: int,
        blocks: int,
        block_size: int,
        heads: int,
        head_dim: int,
        prefix_cache: bool = True,
    ) -> None:
        if blocks < 1 or block_size < 1:
            raise ValueError("a pool needs at least one block of at least one token")
        # Head-major: the blocks a sequence gathers for one head lie end to end, so the
        # model attends over them with one matmul per head and sequence (see onnx_export).
        shape = (heads, layers, blocks, block_size, head_dim)
        # np.empty + fill touches every page now: zeroed-on-demand pages would otherwise
        # fault in, one by one, inside decode steps the first time each block is used.
        self.keys = np.empty(shape, np.float32)
        self.values = np.empty(shape, np.float32)
        self.keys.fill(0.0)
        self.values.fill(0.0)
        # The arrays the model reads: views, so writes through keys/values are seen at once.
        flat = (heads, layers * blocks, block_size, head_dim)
        self.model_keys = self.keys.reshape(flat)
        self.model_values = self.values.reshape(flat)
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.block_size = block_size
        self.total = blocks
        self.prefix_cache = prefix_cache
        # A stack of free block ids; low ids first so a small load stays in a small region.
        self._free = list(range(blocks - 1, -1, -1))
        # References per block: sequences holding it (a cached prefix block may have many).
        self._refs = np.zeros(blocks, dtype=np.int32)
        # The prefix cache: key -> block and back; unreferenced cached blocks in LRU order
        # (first: evicted first). They count as free.
        self._cached: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._peak = 0
        self.allocated = 0

    @property
    def free(self) -> int:
        """Blocks a borrow can take: never used ones and unreferenced cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        return self.total - self.free

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` cached tokens."""
        return max(1, -(-tokens // self.block_size))

    def borrow(self, count: int) -> list[int] | None:
        """Take ``count`` blocks, or None (taking nothing) when fewer are free. Never-used
        blocks go first; then cached ones nobody holds, least recently used first (their
        prefix keys are dropped)."""
        free = self._free
        if count > len(free) + len(self._evictable):
            return None
        if count <= len(free):
            taken = [free.pop() for _ in range(count)]
        else:
            taken = [free.pop() for _ in range(len(free))]
            for _ in range(count - len(taken)):
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._key_of.pop(block)]
                taken.append(block)
        self._refs[taken] = 1
        self.allocated += count
        self._peak = max(self._peak, self.used)
        return taken

    def prompt_keys(self, prompt: np.ndarray) -> list[bytes]:
        """The prefix keys of ``prompt``'s full blocks (see :func:`prefix_keys`)."""
        return prefix_keys(prompt, self.block_size, len(prompt) // self.block_size)

    def cached_prefix(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys`` (chained, from the prompt's first block) are cached."""
        cached = self._cached
        hits = 0
        for key in keys:
            if key not in cached:
                break
            hits += 1
        return hits

    def borrow_prefix(self, keys: Sequence[bytes], count: int) -> tuple[list[int], int] | None:
        """``count`` blocks for a sequence whose first full prompt blocks have ``keys``:
        the cached ones among the leading keys (one more reference each), then fresh ones.
        Returns (blocks, how many came from the cache), or None (taking nothing) when the
        fresh ones are not free."""
        hits = [self._cached[key] for key in keys[: self.cached_prefix(keys[:count])]]
        refs, evictable = self._refs, self._evictable
        # A cached block nobody holds is counted free: taking it leaves one fewer to borrow.
        idle = sum(1 for block in hits if refs[block] == 0)
        if count - len(hits) > self.free - idle:
            return None
        for block in hits:
            if refs[block] == 0:
                del evictable[block]
            refs[block] += 1
        fresh = self.borrow(count - len(hits))
        assert fresh is not None  # checked above
        self._peak = max(self._peak, self.used)
        return hits + fresh, len(hits)

    def publish(self, block: int, key: bytes) -> bool:
        """Cache ``block`` (full of prompt tokens, held by the caller) under ``key``. False
        when the key is cached already (another sequence computed the same prefix at the
        same time: this block stays private) or the pool does not cache prefixes."""
        if not self.prefix_cache or key in self._cached or block in self._key_of:
            return False
        if self._refs[block] < 1:
            raise RuntimeError(f"block {block} published while not borrowed")
        self._cached[key] = block
        self._key_of[block] = key
        return True

    def give_back(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of ``blocks`` (from :meth:`borrow` or
        :meth:`borrow_prefix`). A block with none left is free again; a cached one stays
        cached until evicted. Returning one not held is a bug: it raises."""
        if not blocks:
            return
        refs = self._refs
        if len(set(blocks)) != len(blocks) or (refs[list(blocks)] < 1).any():
            raise RuntimeError(f"blocks returned that were not borrowed: {list(blocks)}")
        # Last block first: a prefix's later blocks are evicted before its earlier ones
        # (a later block is useless without those before it).
        key_of, evictable, free = self._key_of, self._evictable, self._free
        for block in reversed(blocks):
            refs[block] -= 1
            if refs[block] == 0:
                if block in key_of:
                    evictable[block] = None
                else:
                    free.append(block)

    def write(
        self, blocks: np.ndarray, offsets: np.ndarray, keys: np.ndarray, values: np.ndarray
    ) -> None:
        """Store new tokens: ``keys``/``values`` [layers, n, heads, head_dim] at
        (``blocks[i]``, ``offsets[i]``) for each of the n tokens."""
        # The indexed view is [heads, layers, n, head_dim].
        self.keys[:, :, blocks, offsets] = keys.transpose(2, 0, 1, 3)
        self.values[:, :, blocks, offsets] = values.transpose(2, 0, 1, 3)

    def stats(self) -> PoolStats:
        return PoolStats(
            total=self.total,
            free=self.free,
            used=self.used,
            peak_used=self._peak,
            block_size=self.block_size,
            bytes=self.keys.nbytes + self.values.nbytes,
            cached=len(self._cached),
            allocated=self.allocated,
        )

    def check(self) -> None:
        """Raise if the free list, the cache and the references disagree (for tests)."""
        free = self._free
        if len(set(free)) != len(free):
            raise AssertionError("a block is on the free list twice")
        if (self._refs[free] != 0).any() or (self._refs < 0).any():
            raise AssertionError("a borrowed block is on the free list")
        if any(block in self._key_of for block in free):
            raise AssertionError("a cached block is on the free list")
        if any(self._refs[block] != 0 for block in self._evictable):
            raise AssertionError("a held block is evictable")
        if {self._key_of[b] for b in self._key_of} != set(self._cached) or any(
            self._cached[k] != b for b, k in self._key_of.items()
        ):
            raise AssertionError("the prefix cache's two maps disagree")
        held = int((self._refs > 0).sum())
        if held + len(free) + len(self._evictable) != self.total:
            raise AssertionError("blocks went missing")
