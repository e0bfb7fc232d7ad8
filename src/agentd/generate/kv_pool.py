"""TokenBlockPool: the KV cache as a preallocated pool of fixed-size blocks.

Keys and values for every layer live in two arrays allocated once at start. A sequence
borrows the blocks it will need when it joins and returns them when it ends (or its client
goes away), so a decode step writes one token's keys and values in place and allocates
nothing. The model sees them as [heads, layers * blocks, block_size, head_dim] and reads
a sequence's tokens through its row of block ids (paged attention, as in vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PoolStats", "TokenBlockPool"]


@dataclass(frozen=True, slots=True)
class PoolStats:
    total: int
    free: int
    used: int
    peak_used: int
    block_size: int
    bytes: int


class TokenBlockPool:
    def __init__(
        self, *, layers: int, blocks: int, block_size: int, heads: int, head_dim: int
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
        # A stack of free block ids; low ids first so a small load stays in a small region.
        self._free = list(range(blocks - 1, -1, -1))
        self._borrowed = np.zeros(blocks, dtype=bool)
        self._peak = 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.total - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` cached tokens."""
        return max(1, -(-tokens // self.block_size))

    def borrow(self, count: int) -> list[int] | None:
        """Take ``count`` blocks, or None (taking nothing) when fewer are free."""
        if count > len(self._free):
            return None
        taken = [self._free.pop() for _ in range(count)]
        self._borrowed[taken] = True
        self._peak = max(self._peak, self.used)
        return taken

    def give_back(self, blocks: Sequence[int]) -> None:
        """Return blocks taken by :meth:`borrow`. Returning one twice is a bug: it raises."""
        if not blocks:
            return
        if not self._borrowed[list(blocks)].all() or len(set(blocks)) != len(blocks):
            raise RuntimeError(f"blocks returned that were not borrowed: {list(blocks)}")
        self._borrowed[list(blocks)] = False
        self._free.extend(reversed(blocks))

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
        )

    def check(self) -> None:
        """Raise if the free list and the borrowed marks disagree (for tests)."""
        free = self._free
        if len(set(free)) != len(free):
            raise AssertionError("a block is on the free list twice")
        if self._borrowed[free].any():
            raise AssertionError("a borrowed block is on the free list")
        if int(self._borrowed.sum()) + len(free) != self.total:
            raise AssertionError("blocks went missing")
