"""A GGUF model run by llama.cpp as a :class:`~agentd.generate.types.SequenceBackend`.

llama-cpp-python is an optional extra (``pip install 'agentd[gguf]'``; it compiles
llama.cpp from source, a few minutes) and is imported only when a model is loaded. Sampling
stays in agentd (:class:`~agentd.generate.sampling.Sampler`): llama.cpp only evaluates
tokens and returns logits.

No llama.cpp error leaves this module raw: a file it cannot load is InvalidArgument, a failed
evaluation Internal, each with the llama-cpp-python exception as its ``__cause__``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agentd.errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted
from agentd.generate.serial import SerialGenerator
from agentd.generate.types import LMInfo

__all__ = ["GGUFBackend", "load_gguf"]

_INSTALL_HINT = "install it with: pip install 'agentd[gguf]'"
# With verbose=False llama-cpp-python silences llama.cpp's load log by pointing the process's
# stdout/stderr file descriptors at /dev/null for the duration of the load; two loads at
# once could restore them in the wrong order, so loads take turns.
_LOAD_LOCK = threading.Lock()


class GGUFBackend:
    def __init__(self, path: Path, name: str, *, n_ctx: int = 0, threads: int = 2) -> None:
        """``n_ctx`` 0 takes the model's own context length."""
        try:
            import llama_cpp
        except ImportError:
            raise FailedPrecondition(
                f"GGUF models need llama-cpp-python; {_INSTALL_HINT}"
            ) from None
        self._llama_cpp = llama_cpp
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"no GGUF file at {path}")
        try:
            with _LOAD_LOCK:
                self._llama = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_threads=threads,
                    n_threads_batch=threads,
                    logits_all=False,
                    verbose=False,
                )
            self.info = LMInfo(
                name=name,
                platform="gguf",
                context_length=int(self._llama.n_ctx()),
                vocab_size=int(self._llama.n_vocab()),
                eos_token_ids=(int(self._llama.token_eos()),),
            )
        except MemoryError as exc:
            raise ResourceExhausted(f"not enough memory to load GGUF model {path}") from exc
        except Exception as exc:  # llama-cpp-python reports a bad file as ValueError
            raise InvalidArgument(f"cannot load GGUF model {path}: {exc}") from exc

    def _last_logits(self) -> np.ndarray:
        # The last evaluated position's row; llama-cpp-python keeps no copy without
        # logits_all, so read llama.cpp's buffer and copy it before the next eval.
        row = self._llama_cpp.llama_get_logits_ith(self._llama.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.info.vocab_size,)).copy()

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        try:
            self._llama.reset()
            self._llama.eval(list(prompt_ids))
            return self._last_logits()
        except Exception as exc:
            raise self._eval_error(exc) from exc

    def decode(self, token_id: int) -> np.ndarray:
        try:
            self._llama.eval([token_id])
            return self._last_logits()
        except Exception as exc:
            raise self._eval_error(exc) from exc

    def _eval_error(self, exc: Exception) -> Internal:
        # The generator checked the prompt (length, vocabulary) already: what llama.cpp
        # still refuses is a fault of this server, not of the caller.
        return Internal(f"model {self.info.name!r}: llama.cpp failed: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._llama.close()


def load_gguf(path: Path, name: str, *, n_ctx: int = 0, threads: int = 2) -> SerialGenerator:
    """Load a GGUF file as a token streamer (llama.cpp on ``threads`` CPU threads)."""
    return SerialGenerator(GGUFBackend(path, name, n_ctx=n_ctx, threads=threads))
