"""A Hugging Face transformers causal LM as a :class:`~agentd.generate.types.SequenceBackend`.

The reference implementation for the built-in model: fp32 on CPU, one sequence at a time,
the KV cache in ``past_key_values``. transformers and torch are an optional extra
(``pip install 'agentd[hf]'``) and are imported only when a model is loaded.

No torch or transformers error leaves this module raw: a folder that cannot be loaded is
InvalidArgument, a failed forward pass Internal, each with the original exception as its
``__cause__``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agentd.errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted
from agentd.generate.serial import SerialGenerator
from agentd.generate.types import LMInfo

__all__ = ["HFBackend", "load_hf"]

_INSTALL_HINT = "install it with: pip install 'agentd[hf]'"


def _eos_ids(*values: object) -> tuple[int, ...]:
    """The first eos setting given (an int or a list of ints), as a tuple."""
    for value in values:
        if isinstance(value, int):
            return (value,)
        if isinstance(value, list | tuple) and value:
            return tuple(int(v) for v in value)
    return ()


class HFBackend:
    """``AutoModelForCausalLM`` from a local folder, fp32, greedy-exact with ``generate``."""

    def __init__(self, folder: Path, name: str, *, threads: int | None = None) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise FailedPrecondition(
                f"HF models need transformers and torch ({exc.name} is missing); {_INSTALL_HINT}"
            ) from None
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise InvalidArgument(f"{folder} is not a Hugging Face model folder (no config.json)")
        if threads is not None:
            torch.set_num_threads(threads)
        self._torch = torch
        try:
            self._model = AutoModelForCausalLM.from_pretrained(folder).float().eval()
            config = self._model.config
            generation = getattr(self._model, "generation_config", None)
            self.info = LMInfo(
                name=name,
                platform="hf",
                context_length=int(config.max_position_embeddings),
                vocab_size=int(config.vocab_size),
                eos_token_ids=_eos_ids(
                    getattr(generation, "eos_token_id", None), config.eos_token_id
                ),
            )
        except MemoryError as exc:
            raise ResourceExhausted(
                f"not enough memory to load Hugging Face model {folder}"
            ) from exc
        except Exception as exc:  # OSError (files), ValueError (config), safetensors errors
            raise InvalidArgument(
                f"cannot load Hugging Face model {folder}: {type(exc).__name__}: {exc}"
            ) from exc
        # The KV cache argument (and output field) is `past_key_values` up to transformers
        # 5.2x and `cache` after; the old name warns in newer versions.
        forward = inspect.signature(self._model.forward).parameters
        self._cache_name = "cache" if "cache" in forward else "past_key_values"
        self._past: Any = None

    def _forward(self, ids: list[int]) -> np.ndarray:
        torch = self._torch
        try:
            with torch.no_grad():
                out = self._model(
                    input_ids=torch.tensor([ids], dtype=torch.long),
                    use_cache=True,
                    **{self._cache_name: self._past},
                )
            self._past = getattr(out, self._cache_name)
            return out.logits[0, -1].float().numpy().copy()
        except Exception as exc:
            # The generator checked the prompt already: a failing forward pass is this
            # server's fault (out of memory, a broken model), not the caller's.
            raise Internal(
                f"model {self.info.name!r}: the forward pass failed: {type(exc).__name__}: {exc}"
            ) from exc

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        self._past = None
        return self._forward(list(prompt_ids))

    def decode(self, token_id: int) -> np.ndarray:
        return self._forward([token_id])

    def close(self) -> None:
        self._past = None


def load_hf(folder: Path, name: str, *, threads: int | None = None) -> SerialGenerator:
    """Load a HF causal LM folder (config.json + safetensors) as a token streamer."""
    return SerialGenerator(HFBackend(folder, name, threads=threads))
