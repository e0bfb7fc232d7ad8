"""GenerationService: the node's language models, found in model folders, loaded at start
and (re)loaded or unloaded by name later (``agentd models load|unload``, live reload).

The language models of the node's :class:`~agentd.models.catalog.ModelCatalog` (folders
whose config.yaml says ``kind: language-model``) are served here; the tensor models'
repository takes the same catalogue and serves the others. The ONNX form runs on the token
engine; GGUF and HF forms run through their optional extras.

A reload builds the new version beside the old and swaps it in with one assignment: new
requests get the new one; streams already running finish on the old one, which is closed
once its last stream ends (each served generator counts its open streams).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentd.deadlines import DeadlinePolicy
from agentd.errors import AgentdError, Internal, InvalidArgument, NotFound
from agentd.generate.chat import BOS, chat_pieces
from agentd.generate.chat_template import load_chat_template
from agentd.generate.config import LMConfig, parse_lm_config
from agentd.generate.engine import EngineObserver
from agentd.generate.text_stream import TextStream
from agentd.generate.tokenizer import Tokenizer
from agentd.generate.types import LMInfo, SamplingParams, TextGenerator
from agentd.models.catalog import CatalogEntry, ModelCatalog, ModelKind

if TYPE_CHECKING:
    from agentd.observability.spans import Spans

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
        template = self.tokenizer.chat_template  # a model's own names its BOS (or none)
        return self.tokenizer.encode((BOS if template is None else template.bos_token) + text)

    def chat_prompt(self, messages: Sequence[Mapping[str, object]]) -> list[int]:
        """The chat template around the messages; special tokens inside a message's
        content are its text, not template tokens."""
        template = self.tokenizer.chat_template  # the model's own, or None: the built-in
        pieces = chat_pieces(messages) if template is None else template.pieces(messages)
        self._check_length(sum(len(text) for text, _special in pieces))
        return self.tokenizer.encode_chat(pieces)

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
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        deadline: float | None = None,
        spans: Spans | None = None,
    ) -> TextStream:
        """Start a completion. ``max_tokens`` is cut to what the context leaves after the
        prompt (0 means all of it); a prompt that fills the context raises PromptTooLong.
        Past ``deadline`` (the event loop's clock) it stops with DeadlineExceeded. With
        ``spans`` (tracing on) the completion is a ``generate`` span."""
        context = self.config.context_length
        if len(prompt_ids) >= context:
            raise PromptTooLong(len(prompt_ids), context, self.name)
        room = context - len(prompt_ids)
        max_tokens = room if params.max_tokens == 0 else min(params.max_tokens, room)
        if max_tokens != params.max_tokens:
            params = dataclasses.replace(params, max_tokens=max_tokens)
        return TextStream(
            self.generator, self.tokenizer, prompt_ids, params, deadline=deadline, spans=spans
        )


def load_language_model(
    config: LMConfig,
    *,
    threads: int = 2,
    providers: list[str] | None = None,
    observer: EngineObserver | None = None,
) -> LanguageModel:
    """Blocking: read the tokenizer and build the backend for ``config.platform``."""
    tokenizer = Tokenizer(config.tokenizer_path)
    tokenizer.chat_template = load_chat_template(config)
    if config.platform == "onnxruntime":
        from agentd.generate.onnx_lm import load_onnx_lm

        generator: TextGenerator = load_onnx_lm(
            config, threads=threads, providers=providers, observer=observer
        )
    elif config.platform == "gguf":
        from agentd.generate.gguf_engine import load_gguf_lm

        generator = load_gguf_lm(config, threads=threads, observer=observer)
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


class _Served:
    """A loaded model's generator, counting its open streams: a replaced or unloaded model
    is closed once they have all ended (closing it at once would cut them)."""

    def __init__(self, inner: TextGenerator) -> None:
        self.inner = inner
        self.open = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    @property
    def info(self) -> LMInfo:
        return self.inner.info

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[int, None]:
        # The inner call checks the request now; a refused one is not counted.
        return _Counted(self.inner.stream(prompt_ids, params), self)

    def acquire(self) -> None:
        self.open += 1
        self._idle.clear()

    def release(self) -> None:
        self.open -= 1
        if self.open == 0:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no stream of this generator is open."""
        await self._idle.wait()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # gauges() and the backends' own extras.
        return getattr(self.inner, name)


class _Counted(AsyncGenerator[int, None]):
    """One stream's tokens; counted open from its start until it ends, is closed, or is
    dropped without ever being iterated."""

    __slots__ = ("_owner", "_tokens")

    def __init__(self, tokens: AsyncGenerator[int, None], owner: _Served) -> None:
        self._tokens: AsyncGenerator[int, None] | None = tokens
        self._owner = owner
        owner.acquire()

    async def __anext__(self) -> int:
        tokens = self._tokens
        if tokens is None:
            raise StopAsyncIteration
        try:
            return await tokens.__anext__()
        except StopAsyncIteration:
            self._release()
            raise

    async def asend(self, value: None) -> int:
        return await self.__anext__()

    async def athrow(self, *args: Any) -> int:
        tokens = self._tokens
        if tokens is None:
            raise StopAsyncIteration
        return await tokens.athrow(*args)

    async def aclose(self) -> None:
        tokens = self._tokens
        try:
            if tokens is not None:
                await tokens.aclose()
        finally:
            self._release()

    def _release(self) -> None:
        if self._tokens is not None:
            self._tokens = None
            self._owner.release()

    def __del__(self) -> None:
        self._release()


class GenerationService:
    """The language models of ``catalog`` (or of a catalogue over ``folders``).
    ``deadlines`` is the node's deadline rule, applied by :meth:`complete` (default: no
    limits).

    ``failed`` has why the last load of each model failed (a model that served before keeps
    serving its previous version); ``loaded_at`` when each served version was loaded.
    """

    def __init__(
        self,
        catalog: ModelCatalog | Iterable[Path],
        *,
        threads: int = 2,
        providers: list[str] | None = None,
        observer: EngineObserver | None = None,
        deadlines: DeadlinePolicy | None = None,
        spans: Spans | None = None,
    ) -> None:
        # Tracing on: a span per completion (ctx.generate, the OpenAI API).
        self.spans = spans
        self._catalog = catalog if isinstance(catalog, ModelCatalog) else ModelCatalog(catalog)
        self._deadlines = deadlines or DeadlinePolicy()
        self._threads = threads
        self._providers = providers
        self._observer = observer
        self._models: dict[str, LanguageModel] = {}
        self.failed: dict[str, str] = {}
        self.loaded_at: dict[str, float] = {}
        # Loads and unloads of one model take turns.
        self._locks: dict[str, asyncio.Lock] = {}
        # Builds whose caller was cancelled (closed by aclose), and replaced models waiting
        # for their streams to end before they close.
        self._building: set[asyncio.Future[LanguageModel]] = set()
        self._retiring: dict[asyncio.Task[None], LanguageModel] = {}

    @property
    def catalog(self) -> ModelCatalog:
        return self._catalog

    def discover(self) -> list[Path]:
        """The language model folders of the catalogue (a later folder overrides an
        earlier one's model of the same name)."""
        return [entry.source for entry in self._catalog.entries(ModelKind.LANGUAGE)]

    async def start(self) -> None:
        """Load every language model of the catalogue (scanned again: folders added since
        it was built count); a failure is recorded in ``failed``, never raised."""
        self._catalog.scan()
        for entry in self._catalog.entries(ModelKind.LANGUAGE):
            try:
                model = await self._build(entry)
            except AgentdError:
                continue
            self._install(entry.name, model)

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a language model: in the catalogue (scanned again) or served."""
        return self._entry(name) is not None or name in self._models

    async def load(self, name: str) -> LanguageModel:
        """Load ``name`` from its folder, or reload it when it is served: the new version is
        built beside the old one (off the event loop) and swapped in with one assignment;
        streams running on the old version finish on it, and it closes after them.

        Raises NotFound (no language model of that name in the catalogue) or the
        AgentdError that says why it did not load (recorded in ``failed``; a served model
        keeps serving its previous version)."""
        async with self._lock(name):
            entry = self._entry(name)
            if entry is None:
                raise NotFound(f"no language model {name!r} in the model folders")
            model = await self._build(entry)
            self._install(name, model)
            return model

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get NotFound at once; its running streams
        finish, then it closes. NotFound if it is neither served nor failed."""
        async with self._lock(name):
            model = self._models.pop(name, None)
            failed = self.failed.pop(name, None)
            self.loaded_at.pop(name, None)
            if model is None and failed is None:
                raise NotFound(f"The model '{name}' does not exist")
            if model is not None:
                self._retire(model)
                log.info("language model %s unloaded", name)

    def _entry(self, name: str) -> CatalogEntry | None:
        """The catalogue's language model ``name`` (the folders scanned again), or None."""
        self._catalog.scan()
        return next((e for e in self._catalog.entries(ModelKind.LANGUAGE) if e.name == name), None)

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def _build(self, entry: CatalogEntry) -> LanguageModel:
        """Read ``entry``'s config and load its model on a thread; a failure is logged,
        recorded in ``failed`` and raised as an AgentdError."""
        name = entry.name
        try:
            config = parse_lm_config(entry.require_document(), entry.source)
            if config.name != name:
                raise InvalidArgument(
                    f"{entry.config_path}: name {config.name!r} differs from its folder "
                    f"name {name!r}"
                )
            build = asyncio.ensure_future(
                asyncio.to_thread(
                    load_language_model,
                    config,
                    threads=self._threads,
                    providers=self._providers,
                    observer=self._observer,
                )
            )
            self._building.add(build)
            try:
                model = await asyncio.shield(build)
            except asyncio.CancelledError:
                raise  # left in _building: aclose closes what it built
            except AgentdError:
                self._building.discard(build)
                raise
            except Exception as exc:
                # The backend's own error (a truncated model file, say): a reason, not a 500.
                self._building.discard(build)
                raise Internal(f"{entry.source}: {type(exc).__name__}: {exc}") from exc
            self._building.discard(build)
        except AgentdError as exc:
            self.failed[name] = exc.message
            serving = " (still serving the previous version)" if name in self._models else ""
            log.error("language model %s failed to load%s: %s", name, serving, exc.message)
            raise
        return LanguageModel(model.config, _Served(model.generator), model.tokenizer)

    def _install(self, name: str, model: LanguageModel) -> None:
        old = self._models.get(name)
        self._models[name] = model  # one step: new requests get the new version
        self.failed.pop(name, None)
        self.loaded_at[name] = time.time()
        log.info(
            "language model %s %s (%s)",
            name,
            "reloaded" if old else "loaded",
            model.config.platform,
        )
        if old is not None:
            self._retire(old)

    def _retire(self, model: LanguageModel) -> None:
        """Close ``model`` once its running streams have ended."""
        task = asyncio.create_task(_close_when_idle(model), name=f"agentd-retire-{model.name}")
        self._retiring[task] = model
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

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
        return model.complete(model.prompt_ids(prompt), params, deadline=deadline, spans=self.spans)

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
        """Close every model: those served, those waiting for their streams to end, and
        those whose load was cancelled (once built)."""
        for task, model in list(self._retiring.items()):
            task.cancel()
            await model.generator.close()
        for build in list(self._building):
            try:
                model = await build
            except Exception:
                continue
            await model.generator.close()
        self._building.clear()
        for model in self._models.values():
            await model.generator.close()
        self._models.clear()


async def _close_when_idle(model: LanguageModel) -> None:
    generator = model.generator
    if isinstance(generator, _Served):
        await generator.idle()
    await generator.close()
