"""Next-token choice from logits: greedy, temperature, top-k, top-p, seeded; OpenAI's
presence/frequency penalties and logit_bias; the chosen token's logprob and the top
alternatives when asked.

One :class:`Sampler` per sequence. Every backend uses it, so a seeded request picks the same
tokens from the same logits whichever runtime produced them.
"""

from __future__ import annotations

import numpy as np

from agentd.generate.types import SamplingParams, ScoredToken

__all__ = ["Sampler", "log_softmax"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax of one row, in float64."""
    row = np.asarray(logits, dtype=np.float64)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


class Sampler:
    __slots__ = (
        "_bias_ids",
        "_bias_values",
        "_counts",
        "_frequency",
        "_presence",
        "_rng",
        "_shaped",
        "_temperature",
        "_top_k",
        "_top_logprobs",
        "_top_p",
        "_wants_logprobs",
        "greedy",
    )

    def __init__(self, params: SamplingParams) -> None:
        self._temperature = params.temperature
        self._top_k = params.top_k
        self._top_p = params.top_p
        self._presence = params.presence_penalty
        self._frequency = params.frequency_penalty
        self._shaped = params.shapes_logits
        self._wants_logprobs = params.logprobs
        self._top_logprobs = params.top_logprobs if params.logprobs else 0
        bias = dict(params.logit_bias)  # a repeated id: the last value counts
        self._bias_ids = np.fromiter(bias, np.int64, len(bias)) if bias else None
        self._bias_values = np.fromiter(bias.values(), np.float64, len(bias)) if bias else None
        # Tokens this sequence has generated, with their counts (for the penalties).
        self._counts: dict[int, int] | None = (
            {} if params.presence_penalty or params.frequency_penalty else None
        )
        # The pick is the argmax of the raw logits, nothing else to do: callers may batch
        # it (the engine's runner takes one argmax over the step) and skip this sampler.
        self.greedy = params.greedy and not self._shaped and not params.logprobs
        # Without a seed each sequence draws from fresh OS entropy.
        self._rng = None if params.greedy else np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """Pick a token id from one row of logits (any float dtype, shape [vocab]); a
        :class:`ScoredToken` when logprobs were asked for."""
        raw = logits
        if self._shaped:
            logits = self._shape(logits)
        token = self._pick(logits)
        counts = self._counts
        if counts is not None:
            counts[token] = counts.get(token, 0) + 1
        if self._wants_logprobs:
            return self._scored(raw, token)
        return token

    def _shape(self, logits: np.ndarray) -> np.ndarray:
        """The logits after logit_bias and the penalties (a copy, in float64)."""
        shaped = np.array(logits, dtype=np.float64)
        if self._bias_ids is not None and self._bias_values is not None:
            shaped[self._bias_ids] += self._bias_values
        counts = self._counts
        if counts:
            ids = np.fromiter(counts, np.int64, len(counts))
            seen = np.fromiter(counts.values(), np.float64, len(counts))
            # As OpenAI defines them: count * frequency + (count > 0) * presence.
            shaped[ids] -= seen * self._frequency + self._presence
        return shaped

    def _scored(self, raw: np.ndarray, token: int) -> ScoredToken:
        logprobs = log_softmax(raw)
        k = min(self._top_logprobs, logprobs.shape[0])
        top: tuple[tuple[int, float], ...] = ()
        if k:
            best = np.argpartition(-logprobs, k - 1)[:k]
            # Most likely first; equal logprobs in id order (reproducible).
            best = best[np.lexsort((best, -logprobs[best]))]
            top = tuple((int(i), float(logprobs[i])) for i in best)
        return ScoredToken(token, float(logprobs[token]), top)

    def _pick(self, logits: np.ndarray) -> int:
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
