"""The token engine's ONNX runner: builds a step's tensors, runs the session, samples.

Runs on the engine's worker threads, one call per lane at a time; each lane works on its own
sequences' blocks of the :class:`~agentd.generate.kv_pool.TokenBlockPool`, whose arrays the
session reads in place (bound once as OrtValues). An onnxruntime error in a run becomes
agentd's (``Internal``, or ``Unavailable`` when the execution provider failed), chained
from it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from agentd.generate.kv_pool import TokenBlockPool
from agentd.generate.sampling import Sampler
from agentd.inference.onnx_runtime import run_error

__all__ = ["OnnxRunner", "RunnerSequence"]


class RunnerSequence(Protocol):
    """What the runner reads and updates of a scheduled sequence (the engine's streams)."""

    prompt: Any  # np.ndarray of token ids
    blocks: list[int]
    length: int
    chunk: int
    next_token: int
    sampler: Sampler
    table: Any  # np.ndarray of ``blocks`` (set by :meth:`OnnxRunner.admitted`)


class OnnxRunner:
    """Runs prefill and decode steps of a paged-cache graph from onnx_export over ``pool``."""

    def __init__(
        self, session: ort.InferenceSession, pool: TokenBlockPool, *, name: str, vocab_size: int
    ) -> None:
        self._session = session
        self.pool = pool
        self._what = f"model {name!r}"
        self._vocab_size = vocab_size
        self._keys = ort.OrtValue.ortvalue_from_numpy(pool.model_keys)
        self._values = ort.OrtValue.ortvalue_from_numpy(pool.model_values)
        self._decode_outputs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @staticmethod
    def admitted(seq: RunnerSequence) -> None:
        """``seq`` got its blocks: keep them as an array for the block tables."""
        seq.table = np.asarray(seq.blocks, dtype=np.int64)

    def forward(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        past_len: np.ndarray,
        table: np.ndarray,
        lane: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One run of the graph over the pool: logits of each row's last token and the new
        tokens' keys and values (to be written with ``pool.write``). The arrays are reused by
        the next run of the same batch size on the same ``lane`` (runs on different lanes may
        overlap). Blocking. Raises Internal or Unavailable from onnxruntime's error."""
        try:
            binding = self._session.io_binding()
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("positions", positions)
            binding.bind_cpu_input("past_len", past_len)
            binding.bind_cpu_input("block_table", table)
            binding.bind_ortvalue_input("k_cache", self._keys)
            binding.bind_ortvalue_input("v_cache", self._values)
            outputs = self._outputs(ids.shape[0], ids.shape[1], lane)
            for name, array in zip(("logits", "new_k", "new_v"), outputs, strict=True):
                binding.bind_output(name, "cpu", 0, np.float32, array.shape, array.ctypes.data)
            self._session.run_with_iobinding(binding)
        except Exception as exc:
            raise run_error(self._what, exc) from exc
        return outputs

    def _outputs(
        self, batch: int, tokens: int, lane: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arrays the session writes its outputs into: kept per lane and batch size for
        decode steps (valid until that lane's next step), so a step allocates no output
        memory."""
        cached = self._decode_outputs.get((lane, batch)) if tokens == 1 else None
        if cached is None:
            pool = self.pool
            new = (pool.layers, batch, tokens, pool.heads, pool.head_dim)
            cached = (
                np.empty((batch, self._vocab_size), np.float32),
                np.empty(new, np.float32),
                np.empty(new, np.float32),
            )
            if tokens == 1:
                self._decode_outputs[lane, batch] = cached
        return cached

    def prefill(self, group: list[RunnerSequence], lane: int) -> list[int | None]:
        """One run over the next ``chunk`` prompt tokens of each sequence in ``group``,
        right-padded to the widest (padding sits after each row's tokens, at position 0,
        so causal attention keeps it out of the real ones). A sequence whose prompt is now
        all in the cache gets its first token; the others None."""
        size = self.pool.block_size
        count = len(group)
        width = max(seq.chunk for seq in group)
        ids = np.zeros((count, width), np.int64)
        positions = np.zeros((count, width), np.int64)
        targets = np.zeros((count, width), np.int64)  # the block each token goes to
        real = np.zeros((count, width), bool)
        for row, seq in enumerate(group):
            chunk = seq.chunk
            span = np.arange(seq.length, seq.length + chunk)
            ids[row, :chunk] = seq.prompt[span]
            positions[row, :chunk] = span
            targets[row, :chunk] = seq.table[span // size]
            real[row, :chunk] = True
        past = np.fromiter((seq.length for seq in group), np.int64, count)
        table = self._block_table(group, past)
        logits, new_k, new_v = self.forward(ids, positions, past, table, lane)
        self.pool.write(targets[real], positions[real] % size, new_k[:, real], new_v[:, real])
        for seq in group:
            seq.length += seq.chunk
        return self._sample(group, logits)

    def decode(self, batch: list[RunnerSequence], lane: int) -> list[int | None]:
        """One decode step: each sequence's last token in, its next token out."""
        size = self.pool.block_size
        count = len(batch)
        lengths = np.fromiter((seq.length for seq in batch), np.int64, count)
        ids = np.fromiter((seq.next_token for seq in batch), np.int64, count)[:, None]
        table = self._block_table(batch, lengths)
        # The block each new token goes to (may lie past the table when a block just filled).
        targets = np.fromiter((seq.table[seq.length // size] for seq in batch), np.int64, count)
        logits, new_k, new_v = self.forward(ids, lengths[:, None], lengths, table, lane)
        self.pool.write(targets, lengths % size, new_k[:, :, 0], new_v[:, :, 0])
        for seq in batch:
            seq.length += 1
        return self._sample(batch, logits)

    def _block_table(self, batch: list[RunnerSequence], lengths: np.ndarray) -> np.ndarray:
        """Each sequence's blocks holding its ``lengths`` cached tokens, zero-padded (the
        graph masks slots at and past each row's length)."""
        used = np.maximum(1, -(-lengths // self.pool.block_size))
        table = np.zeros((len(batch), int(used.max())), np.int64)
        for row, seq in enumerate(batch):
            table[row, : used[row]] = seq.table[: used[row]]
        return table

    @staticmethod
    def _sample(batch: list[RunnerSequence], logits: np.ndarray) -> list[int | None]:
        """The next token of each sequence: one argmax over the batch for greedy rows, a
        draw from their own sampler for the others, None (and no draw, so a seeded
        sampler's draws stay the same) while part of the prompt is not in the cache."""
        picks: list[int | None] = logits.argmax(axis=1).tolist()
        for row, seq in enumerate(batch):
            if seq.length < len(seq.prompt):
                picks[row] = None
            elif not seq.sampler.greedy:
                picks[row] = seq.sampler(logits[row])
        return picks
