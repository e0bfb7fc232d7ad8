"""GenerationService: the node's language models, found in model folders and loaded at start.

The language models of the node's :class:`~agentd.models.catalog.ModelCatalog` (folders
whose config.yaml says ``kind: language-model``) are served here; the tensor models'
repository takes the same catalogue and serves the others. The ONNX form runs on the token
engine; GGUF and HF forms run through their optional extras.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agentd.deadlines import DeadlinePolicy
from agentd.errors import AgentdError, InvalidArgument, NotFound
from agentd.generate.chat import BOS, chat_pieces
from agentd.generate.config import LMConfig, parse_lm_config
from agentd.generate.engine import EngineObserver
from agentd.generate.text_stream import TextStream
from agentd.generate.tokenizer import Tokenizer
from agentd.generate.types import SamplingParams, TextGenerator
from agentd.models.catalog import ModelCatalog, ModelKind

__all__ = ["GenerationService", "LanguageModel", "PromptTooLong"]

log = logging.getLogger("agentd.generate")


class PromptTooLong(InvalidArgument):
    """``tokens`` is None when the text was refused for its length, before tokenizing."""

    def __init__(self, tokens: int | None, context: int, model: str) -> None:
        self.tokens, self.context = tokens, context
        super().__init__(f"the prompt is {self.size}; {model}'s context is {context} tokens")

    @property
    def size(self) -> str:
        return f"over {self.context} tokens" if self.tokens is None else f"{self.tokens} tokens"


@dataclass(frozen=True, slots=True)
class LanguageModel:
    config: LMConfig
    generator: TextGenerator
    tokenizer: Tokenizer

    @property
    def name(self) -> str:
        return self.config.name

    def completion_prompt(self, text: str) -> list[int]:
        """A raw prompt, after the beginning-of-sequence token the model was trained with."""
        self._check_length(len(text))
        return self.tokenizer.encode(BOS + text)

    def chat_prompt(self, messages: Sequence[Mapping[str, object]]) -> list[int]:
        """The chat template around the messages; special tokens inside a message's
        content are its text, not template tokens."""
        pieces = chat_pieces(messages)
        self._check_length(sum(len(text) for text, _special in pieces))
        tokenizer = self.tokenizer
        ids: list[int] = []
        for text, special in pieces:
            token = tokenizer.token_id(text) if special else None
            ids += [token] if token is not None else tokenizer.encode_plain(text)
        return ids

    def prompt_ids(self, prompt: str | Sequence[Mapping[str, object]]) -> list[int]:
        """A raw prompt (``str``) or chat messages, as token ids."""
        if isinstance(prompt, str):
            return self.completion_prompt(prompt)
        return self.chat_prompt(prompt)

    def _check_length(self, chars: int) -> None:
        """PromptTooLong for a text that cannot fit the context whatever its tokens (twice
        the per-token bound, for normalizers that shorten text): tokenizing megabytes on
        the event loop would stall every other request."""
        context = self.config.context_length
        if chars > 2 * context * self.tokenizer.max_token_chars:
            raise PromptTooLong(None, context, self.name)

    def complete(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, deadline: float | None = None
    ) -> TextStream:
        """Start a completion. ``max_tokens`` is cut to what the context leaves after the
        prompt (0 means all of it); a prompt that fills the context raises PromptTooLong.
        Past ``deadline`` (the event loop's clock) it stops with DeadlineExceeded."""
        context = self.config.context_length
        if len(prompt_ids) >= context:
            raise PromptTooLong(len(prompt_ids), context, self.name)
        room = context - len(prompt_ids)
        max_tokens = room if params.max_tokens == 0 else min(params.max_tokens, room)
        if max_tokens != params.max_tokens:
            params = dataclasses.replace(params, max_tokens=max_tokens)
        return TextStream(self.generator, self.tokenizer, prompt_ids, params, deadline=deadline)


def load_language_model(
    config: LMConfig,
    *,
    threads: int = 2,
    providers: list[str] | None = None,
    observer: EngineObserver | None = None,
) -> LanguageModel:
    """Blocking: read the tokenizer and build the backend for ``config.platform``."""
    tokenizer = Tokenizer(config.tokenizer_path)
    if config.platform == "onnxruntime":
        from agentd.generate.onnx_lm import load_onnx_lm

        generator: TextGenerator = load_onnx_lm(
            config, threads=threads, providers=providers, observer=observer
        )
    elif config.platform == "gguf":
        from agentd.generate.gguf_backend import load_gguf

        generator = load_gguf(config.model_path, config.name)
    else:
        from agentd.generate.hf_backend import load_hf

        generator = load_hf(config.model_path, config.name)
    served = generator.info.context_length
    if served < config.context_length:
        # The model's own positions bound the context; report what is really served.
        log.warning(
            "model %s: context_length %d in its config is more than the model holds; "
            "serving %d tokens",
            config.name,
            config.context_length,
            served,
        )
        config = dataclasses.replace(config, context_length=served)
    return LanguageModel(config, generator, tokenizer)


class GenerationService:
    """The language models of ``catalog`` (or of a catalogue over ``folders``).
    ``deadlines`` is the node's deadline rule, applied by :meth:`complete` (default: no
    limits)."""

    def __init__(
        self,
        catalog: ModelCatalog | Iterable[Path],
        *,
        threads: int = 2,
        providers: list[str] | None = None,
        observer: EngineObserver | None = None,
        deadlines: DeadlinePolicy | None = None,
    ) -> None:
        self._catalog = catalog if isinstance(catalog, ModelCatalog) else ModelCatalog(catalog)
        self._deadlines = deadlines or DeadlinePolicy()
        self._threads = threads
        self._providers = providers
        self._observer = observer
        self._models: dict[str, LanguageModel] = {}
        self.failed: dict[str, str] = {}

    def discover(self) -> list[Path]:
        """The language model folders of the catalogue (a later folder overrides an
        earlier one's model of the same name)."""
        return [entry.source for entry in self._catalog.entries(ModelKind.LANGUAGE)]

    async def start(self) -> None:
        """Load every language model of the catalogue (scanned again: folders added since
        it was built count); a failure is recorded in ``failed``, never raised."""
        self._catalog.scan()
        for entry in self._catalog.entries(ModelKind.LANGUAGE):
            source = entry.source
            try:
                config = parse_lm_config(entry.require_document(), source)
                model = await asyncio.to_thread(
                    load_language_model,
                    config,
                    threads=self._threads,
                    providers=self._providers,
                    observer=self._observer,
                )
            except AgentdError as exc:
                self.failed[source.name] = exc.message
                log.error("language model %s failed to load: %s", source.name, exc.message)
                continue
            self._models[model.name] = model
            log.info("language model %s loaded (%s)", model.name, config.platform)

    def models(self) -> list[LanguageModel]:
        return sorted(self._models.values(), key=lambda m: m.name)

    def get(self, name: str) -> LanguageModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"The model '{name}' does not exist")
        return model

    def complete(
        self,
        model: LanguageModel,
        prompt: str | Sequence[Mapping[str, object]],
        params: SamplingParams,
        *,
        timeout: float | None = None,
    ) -> TextStream:
        """Start a completion of ``prompt`` (raw text or chat messages) on ``model``, within
        ``timeout`` seconds (None: the default deadline; never past the maximum).

        Raises PromptTooLong, DeadlineExceeded (a timeout already up), or what the model's
        generator refuses up front (InvalidArgument, ResourceExhausted).
        """
        deadline = self._deadlines.deadline(timeout)
        return model.complete(model.prompt_ids(prompt), params, deadline=deadline)

    def default(self) -> LanguageModel:
        if not self._models:
            raise NotFound("no language model is loaded")
        return self._models.get("tinylm") or self.models()[0]

    def gauges(self) -> dict[str, dict[str, float]]:
        return {
            name: model.generator.gauges()
            for name, model in self._models.items()
            if hasattr(model.generator, "gauges")
        }

    async def aclose(self) -> None:
        for model in self._models.values():
            await model.generator.close()
        self._models.clear()
