"""Next-token choice from logits: greedy, temperature, top-k, top-p, seeded.

One :class:`Sampler` per sequence. Every backend uses it, so a seeded request picks the same
tokens from the same logits whichever runtime produced them.
"""

from __future__ import annotations

import numpy as np

from agentd.generate.types import SamplingParams

__all__ = ["Sampler"]


class Sampler:
    __slots__ = ("_rng", "_temperature", "_top_k", "_top_p", "greedy")

    def __init__(self, params: SamplingParams) -> None:
        self._temperature = params.temperature
        self._top_k = params.top_k
        self._top_p = params.top_p
        self.greedy = params.greedy  # the pick is the argmax (callers may batch it)
        # Without a seed each sequence draws from fresh OS entropy.
        self._rng = None if params.greedy else np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """Pick a token id from one row of logits (any float dtype, shape [vocab])."""
        if self._rng is None:
            return int(np.argmax(logits))
        scaled = np.asarray(logits, dtype=np.float64) / self._temperature
        if 0 < self._top_k < scaled.shape[0]:
            candidates = np.argpartition(scaled, -self._top_k)[-self._top_k :]
        else:
            candidates = np.arange(scaled.shape[0])
        # Highest first; stable so equal logits keep id order (reproducible across runs).
        candidates = candidates[np.argsort(-scaled[candidates], kind="stable")]
        picked = scaled[candidates]
        probs = np.exp(picked - picked[0])
        probs /= probs.sum()
        if self._top_p < 1.0:
            cumulative = np.cumsum(probs)
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            keep = int(np.searchsorted(cumulative, self._top_p)) + 1
            probs = probs[:keep] / cumulative[min(keep, len(cumulative)) - 1]
            candidates = candidates[:keep]
        draw = self._rng.random()
        index = int(np.searchsorted(np.cumsum(probs), draw, side="right"))
        return int(candidates[min(index, len(candidates) - 1)])
