"""The inference data plane: one protocol-neutral service that KServe (REST and gRPC) and
agents' ``ctx.infer`` call. Validates tensors against model metadata, then batches."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from agentd.deadlines import DeadlinePolicy
from agentd.errors import AgentdError, DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from agentd.inference.batcher import BatchObserver, DynamicBatcher
from agentd.inference.embedding import Embeddings
from agentd.inference.repository import ModelEntry, ModelRepository, ModelState
from agentd.inference.types import (
    DataType,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
)

if TYPE_CHECKING:
    from agentd.observability.spans import Spans

__all__ = ["InferenceService"]


class InferenceService:
    """Owns the repository's executors, their batchers and the inference threads.

    ``deadlines`` is the node's deadline rule: ``infer`` without a timeout gets its default,
    and no caller gets more than its maximum (default: no limits).
    """

    def __init__(
        self,
        repository: ModelRepository,
        *,
        threads: int = 2,
        observer: BatchObserver | None = None,
        server_name: str = "agentd",
        server_version: str = "",
        deadlines: DeadlinePolicy | None = None,
        spans: Spans | None = None,
    ) -> None:
        self._repository = repository
        # Tracing on: a span per call, linked from the span of the batch that served it.
        self.spans = spans
        self._deadlines = deadlines or DeadlinePolicy()
        self._observer = observer
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="infer")
        self._batchers: dict[str, DynamicBatcher] = {}
        # name -> (metadata, batcher) of every model that has a batcher: the hot path of
        # ctx.infer (version None) takes both from one lookup.
        self._serving: dict[str, tuple[ModelMetadata, DynamicBatcher, _OneInput | None]] = {}
        self._ready = False
        # kind: embedding models, for /v1/embeddings and ctx.embed.
        self.embeddings = Embeddings(self)
        # Loads and unloads of one model take turns: each swaps that model's batcher.
        self._admin_locks: dict[str, asyncio.Lock] = {}
        self._server = {
            "name": server_name,
            "version": server_version,
            "extensions": ["binary_tensor_data", "model_repository"],
        }

    async def start(self) -> None:
        """Load every model found; failures are recorded per model, never raised."""
        for entry in self._repository.entries():
            await self.load(entry.name)
        self._ready = True

    async def aclose(self) -> None:
        """Close every model: the batches running finish and answer their callers, queued
        calls fail with UNAVAILABLE; then the executors and the inference threads go."""
        self._ready = False
        for name in list(self._batchers):
            await self._drop_batcher(name)
        for entry in self._repository.entries():
            if entry.executor is not None:
                self._repository.unload(entry.name)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- server and model state ---------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._ready

    def server_metadata(self) -> dict[str, Any]:
        return dict(self._server)

    def entries(self) -> list[ModelEntry]:
        """The repository's tensor models as they are now (no scan)."""
        return self._repository.entries()

    def entry(self, name: str) -> ModelEntry:
        """Model ``name`` (NotFound when the repository has none)."""
        return self._repository.entry(name)

    def model_names(self) -> list[str]:
        return [e.name for e in self._repository.entries()]

    def index(self) -> list[ModelEntry]:
        self._repository.scan()
        return self._repository.entries()

    def metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        return self._loaded(name, version).metadata

    def is_ready(self, name: str, version: str | None = None) -> bool:
        entry = self._repository.entry(name)
        if entry.executor is None or entry.state is not ModelState.READY:
            return False
        return version is None or version == entry.executor.metadata.version

    def batcher(self, name: str) -> DynamicBatcher | None:
        return self._batchers.get(name)

    async def load(self, name: str) -> ModelEntry:
        """Load or reload ``name``; a model being reloaded serves its previous version
        until the new one is ready, and keeps serving it when the reload fails
        (``entry.load_error`` says why). No call fails because of a reload: calls that
        arrive once the new version is ready go to it, calls the old version had accepted
        finish on it, and the old version is closed after that."""
        self._repository.scan()
        async with self._admin_lock(name):
            self._repository.begin_load(name)  # NotFound first
            loop = asyncio.get_running_loop()
            built = loop.run_in_executor(self._pool, self._repository.build, name)
            try:
                config, executor = await asyncio.shield(built)
            except AgentdError as exc:
                return self._repository.load_failed(name, exc)
            except asyncio.CancelledError:
                # The new version is not installed: close it once it is built.
                built.add_done_callback(_close_built)
                if self._repository.entry(name).state is ModelState.LOADING:
                    self._repository.load_failed(name, Unavailable("the load was cancelled"))
                raise
            entry, replaced = self._repository.install(name, config, executor)
            # One synchronous step: from here new calls reach the new version's batcher.
            old = self._batchers.pop(name, None)
            self._serving.pop(name, None)
            self._start_batcher(entry)
            try:
                if old is not None:
                    await old.aclose(drain=True)
            finally:
                if replaced is not None:
                    replaced.close()
            return entry

    async def unload(self, name: str, *, drain: bool = False) -> ModelEntry:
        """Unload ``name``: new calls fail at once; its running batch finishes and answers
        its callers, queued calls fail with UNAVAILABLE (with ``drain``: they run first,
        as when its folder is deleted)."""
        self._repository.entry(name)  # NotFound first
        async with self._admin_lock(name):
            await self._drop_batcher(name, drain=drain)
            return self._repository.unload(name)

    def _admin_lock(self, name: str) -> asyncio.Lock:
        lock = self._admin_locks.get(name)
        if lock is None:
            lock = self._admin_locks[name] = asyncio.Lock()
        return lock

    def _start_batcher(self, entry: ModelEntry) -> None:
        if entry.executor is None or entry.config is None:
            return
        name = entry.name
        batcher = DynamicBatcher(
            name,
            entry.executor.run,
            entry.config.batching,
            self._pool,
            self._observer,
            spans=self.spans,
        )
        batcher.start()
        self._batchers[name] = batcher
        metadata = entry.executor.metadata
        self._serving[name] = (metadata, batcher, _one_input(metadata))

    async def _drop_batcher(self, name: str, *, drain: bool = False) -> None:
        self._serving.pop(name, None)
        batcher = self._batchers.pop(name, None)
        if batcher is not None:
            await batcher.aclose(drain=drain)

    # -- inference ----------------------------------------------------------------------

    async def infer(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``inputs`` through model ``name`` (batched with other callers).

        ``timeout`` is the caller's (seconds; None: the service's default deadline, and at
        most its maximum). Raises NotFound, InvalidArgument (naming the tensor and what was
        expected), ResourceExhausted (queue full), DeadlineExceeded, Unavailable or
        Internal. Cancelling the caller drops its rows if their batch has not run yet.
        """
        timeout = self._deadlines.timeout(timeout)
        result = self.infer_nowait(name, inputs, version=version, outputs=outputs)
        return await _answer(name, result, timeout)

    async def infer_request(self, request: InferenceRequest) -> InferenceResponse:
        """Run ``request`` (the form the KServe adapters give) and say which model version
        answered. Its time is the tighter of its ``timeout`` and ``call_timeout`` under
        the node's deadline rule, for every protocol alike. Raises as :meth:`infer`."""
        bounds = [t for t in (request.timeout, request.call_timeout) if t is not None]
        timeout = self._deadlines.timeout(min(bounds) if bounds else None)
        name, version = request.model, request.version
        result = self.infer_nowait(name, request.inputs, version=version, outputs=request.outputs)
        # Nothing awaited since the call was queued: this is the version it was queued on
        # (a reload swaps the served version in one synchronous step).
        metadata = self.metadata(name, version)
        outputs = await _answer(name, result, timeout)
        return InferenceResponse(metadata.name, metadata.version, outputs)

    def infer_nowait(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """Validate and queue; the future gets the outputs. The hot path of ``ctx.infer``:
        one future, no coroutine per layer. Cancelling the future drops the rows if their
        batch has not formed yet."""
        serving = self._serving.get(name) if version is None else None
        if serving is None:
            metadata = self.metadata(name, version)  # NotFound / Unavailable, explained
            batcher = self._batchers.get(name)
            if batcher is None:
                raise Unavailable(f"model {name!r} is not loaded")
            one = None
        else:
            metadata, batcher, one = serving
        rows = None
        if one is not None and len(inputs) == 1:
            # One batched input of fixed inner shape (the decision model): checked inline.
            input_name, dtype, ndim, inner, max_rows = one
            array = inputs.get(input_name)
            if array is not None:
                shape = array.shape
                if (
                    len(shape) == ndim
                    and shape[1:] == inner
                    and 1 <= shape[0] <= max_rows
                    and (array.dtype is dtype or array.dtype == dtype)
                ):
                    rows = shape[0]
        else:
            rows = _quick_rows(metadata, inputs)
        if rows is None:
            rows = _validate(metadata, inputs)  # the slow path explains what is wrong
        wanted = _wanted_outputs(metadata, outputs) if outputs else None
        spans = self.spans
        if spans is None:
            return batcher.submit_nowait(inputs, rows, wanted)
        call = spans.infer(name, rows)  # a child of the caller's span (turn, request)
        try:
            future = batcher.submit_nowait(inputs, rows, wanted, call.context)
        except BaseException as exc:  # refused (queue full, unloaded): the span says why
            call.failed(exc)
            raise
        future.add_done_callback(call.done)
        return future

    def _loaded(self, name: str, version: str | None) -> Any:
        entry = self._repository.entry(name)
        if entry.executor is None:
            detail = f": {entry.reason}" if entry.reason else ""
            raise Unavailable(f"model {name!r} is {entry.state.value.lower()}{detail}")
        if version not in (None, "", entry.executor.metadata.version):
            raise NotFound(f"model {name!r} has no version {version!r}")
        return entry.executor


_MAX_ELEMENTS = 1 << 28


async def _answer(
    name: str, result: asyncio.Future[dict[str, np.ndarray]], timeout: float | None
) -> dict[str, np.ndarray]:
    """``result``'s outputs, or DeadlineExceeded once ``timeout`` seconds have passed (its
    rows are dropped when their batch has not run yet)."""
    if timeout is None:
        return await result
    try:
        async with asyncio.timeout(timeout):
            return await result
    except TimeoutError:
        raise DeadlineExceeded(f"model {name!r} did not answer within {timeout:.3f}s") from None


def _close_built(built: asyncio.Future[tuple[Any, Any]]) -> None:
    """Close an executor built for a load that was cancelled before it was installed."""
    if not built.cancelled() and built.exception() is None:
        built.result()[1].close()


# (input name, numpy dtype, dimensions, shape past the batch dimension, max batch size)
_OneInput = tuple[str, np.dtype, int, tuple[int, ...], int]


def _one_input(metadata: ModelMetadata) -> _OneInput | None:
    """The check for a model with one batched input of fixed inner shape, else None."""
    if metadata.max_batch_size <= 0 or len(metadata.input_checks) != 1:
        return None
    name, dtype, shape, fixed = metadata.input_checks[0]
    if not fixed:
        return None
    return name, dtype, len(shape), tuple(shape[1:]), metadata.max_batch_size


def _validate(metadata: ModelMetadata, inputs: Mapping[str, np.ndarray]) -> int:
    """Check names, types and shapes; return the batch size (1 for unbatched models)."""
    expected = {spec.name for spec in metadata.inputs}
    for name in inputs:
        if name not in expected:
            raise InvalidArgument(
                f"model {metadata.name!r} has no input {name!r}; its inputs are {sorted(expected)}"
            )
    rows: int | None = None
    for spec in metadata.inputs:
        array = inputs.get(spec.name)
        if array is None:
            raise InvalidArgument(f"missing input {spec.name!r} for model {metadata.name!r}")
        got = _datatype(array)
        if got is not spec.datatype:
            raise InvalidArgument(
                f"input {spec.name!r}: expected datatype {spec.datatype.value}, got {got.value}"
            )
        if not spec.accepts_shape(array.shape):
            raise InvalidArgument(
                f"input {spec.name!r}: expected shape {list(spec.shape)}, got {list(array.shape)}"
            )
        if math.prod(array.shape) > _MAX_ELEMENTS:
            raise InvalidArgument(f"input {spec.name!r} has too many elements")
        if metadata.max_batch_size:
            batch = array.shape[0]
            if rows is None:
                rows = batch
            elif batch != rows:
                raise InvalidArgument(
                    f"input {spec.name!r}: batch size {batch} differs from the other inputs' {rows}"
                )
    if not metadata.max_batch_size:
        return 1
    assert rows is not None
    if not 1 <= rows <= metadata.max_batch_size:
        raise InvalidArgument(
            f"batch size {rows} is outside 1..{metadata.max_batch_size} for model {metadata.name!r}"
        )
    return rows


def _quick_rows(metadata: ModelMetadata, inputs: Mapping[str, np.ndarray]) -> int | None:
    """The batch size if every input is exactly right, else None (then ``_validate``).

    The hot path of ctx.infer: plain comparisons against shapes prepared once per model.
    """
    checks = metadata.input_checks
    if len(inputs) != len(checks):
        return None
    batched = metadata.max_batch_size > 0
    rows = 1
    for index, (name, dtype, shape, fixed) in enumerate(checks):
        array = inputs.get(name)
        if array is None or array.dtype != dtype:
            return None
        got = array.shape
        if batched:
            if len(got) != len(shape) or (fixed and got[1:] != shape[1:]):
                return None
            if index == 0:
                rows = got[0]
            elif got[0] != rows:
                return None
        elif got != shape:
            return None
        if not fixed:
            return None  # dimensions of any size: let _validate check them all
    if batched and not 1 <= rows <= metadata.max_batch_size:
        return None
    return rows


def _datatype(array: np.ndarray) -> DataType:
    try:
        return DataType.from_numpy(array.dtype)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _wanted_outputs(metadata: ModelMetadata, outputs: Sequence[str] | None) -> Sequence[str] | None:
    """The outputs to return (None: all), checked against the model."""
    if not outputs:
        return None
    names = metadata.output_names
    for name in outputs:
        if name not in names:
            raise InvalidArgument(
                f"model {metadata.name!r} has no output {name!r}; its outputs are "
                f"{[spec.name for spec in metadata.outputs]}"
            )
    return outputs
