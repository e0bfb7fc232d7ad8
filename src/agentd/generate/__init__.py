"""Token generation: language models that stream tokens.

The ONNX token engine (pooled KV cache, continuous batching) is the main backend; GGUF
(llama-cpp-python) and HF (transformers) backends plug in behind the same
:class:`~agentd.generate.types.TextGenerator` protocol. Sampling and the chat template are
shared by all backends so a seeded request gives the same tokens whichever runs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentd.generate.engine import TokenEngine
    from agentd.generate.scheduler import Scheduler
    from agentd.generate.service import GenerationService, LanguageModel, PromptTooLong
    from agentd.generate.types import SamplingParams, TextGenerator

__all__ = [
    "GenerationService",
    "LanguageModel",
    "PromptTooLong",
    "SamplingParams",
    "Scheduler",
    "TextGenerator",
    "TokenEngine",
]

# Imported when first asked for: importing the package (e.g. for its pure scheduler) must
# not load onnxruntime.
_HOMES = {
    "GenerationService": "agentd.generate.service",
    "LanguageModel": "agentd.generate.service",
    "PromptTooLong": "agentd.generate.service",
    "SamplingParams": "agentd.generate.types",
    "Scheduler": "agentd.generate.scheduler",
    "TextGenerator": "agentd.generate.types",
    "TokenEngine": "agentd.generate.engine",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'agentd.generate' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
