"""ONNX Runtime: the node's session factory, and the tensor models' loader and executor.

:class:`SessionFactory` is the one place sessions are made, for tensor models and for the
token engine's language models alike: session options, threads, execution providers (the
best installed, else those asked for) and the fallback to the CPU provider. It and
:func:`run_error` turn onnxruntime's exceptions into agentd's error tree (chained with
``from``), so no raw onnxruntime error reaches a caller.

One session per model, shared by every caller (ONNX Runtime sessions are thread-safe).
Inputs are bound as OrtValues over the callers' numpy arrays, so request bytes reach the
session without a copy; outputs whose shapes are known before the run are bound to numpy
arrays allocated here, so results land where the caller reads them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agentd.errors import AgentdError, Internal, InvalidArgument, Unavailable
from agentd.inference.types import DataType, ModelConfig, ModelMetadata, TensorSpec

__all__ = [
    "PREFERRED_PROVIDERS",
    "OnnxExecutor",
    "OnnxLoader",
    "SessionFactory",
    "choose_providers",
    "run_error",
]

log = logging.getLogger(__name__)

# Fastest first; whichever of these the installed onnxruntime build has is used.
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)

_ONNX_TYPES = {
    "tensor(bool)": DataType.BOOL,
    "tensor(uint8)": DataType.UINT8,
    "tensor(uint16)": DataType.UINT16,
    "tensor(uint32)": DataType.UINT32,
    "tensor(uint64)": DataType.UINT64,
    "tensor(int8)": DataType.INT8,
    "tensor(int16)": DataType.INT16,
    "tensor(int32)": DataType.INT32,
    "tensor(int64)": DataType.INT64,
    "tensor(float16)": DataType.FP16,
    "tensor(float)": DataType.FP32,
    "tensor(double)": DataType.FP64,
    "tensor(string)": DataType.BYTES,
}


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The execution providers to use: ``requested`` if given, else the best installed."""
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise InvalidArgument(
                f"execution providers {missing} are not in this onnxruntime build "
                f"(available: {available})"
            )
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available]


# onnxruntime's exception types (pybind11 classes, all plain Exception subclasses).
_ORT_ERRORS = ort.capi.onnxruntime_pybind11_state
# The device or its provider failed, not the model or the request: worth a retry later.
_DEVICE_ERRORS = tuple(
    getattr(_ORT_ERRORS, name)
    for name in ("EPFail", "DeviceReset", "ModelLoadCanceled")
    if hasattr(_ORT_ERRORS, name)
)

# The model file itself is at fault: another provider would not load it either.
_LOAD_ERRORS = tuple(
    getattr(_ORT_ERRORS, name)
    for name in ("NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph")
    if hasattr(_ORT_ERRORS, name)
)


def run_error(what: str, exc: Exception) -> AgentdError:
    """The agentd error for ``exc`` raised by a session run of ``what`` (e.g. "model 'm'"):
    Unavailable when the device or its provider failed, else Internal (the request passed
    agentd's checks, so a failing graph is the server's problem, and one bad row must not
    blame the others batched with it). Raise it ``from exc``."""
    if isinstance(exc, AgentdError):
        return exc
    if isinstance(exc, _DEVICE_ERRORS):
        return Unavailable(f"{what} could not run on its execution provider: {exc}")
    return Internal(f"{what} failed to run: {exc}")


class SessionFactory:
    """Makes ONNX Runtime sessions with the node's options.

    ``threads``: intra-op threads per session (default: one per core); ``providers``: the
    execution providers to use, in order (default: the fastest installed, see
    ``PREFERRED_PROVIDERS``). Asked-for providers that this onnxruntime build lacks raise
    InvalidArgument here, at start; providers chosen by default that fail to create a
    session fall back to the CPU provider alone (logged).
    """

    def __init__(
        self, *, threads: int | None = None, providers: Sequence[str] | None = None
    ) -> None:
        self.threads = threads or os.cpu_count() or 1
        self.providers = tuple(choose_providers(providers))
        self._fallback = not providers and self.providers != ("CPUExecutionProvider",)

    def options(self, threads: int | None = None) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # ONNX Runtime's threads busy-wait between runs by default; on a small machine that
        # spin takes the cores the event loop needs (perf: 22% of the server's CPU in one
        # pause instruction; turning it off took KServe gRPC from 4.2k to 6.9k req/s).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def open(self, path: Path, *, threads: int | None = None) -> ort.InferenceSession:
        """A session over the model file ``path``; blocking. Raises InvalidArgument (not a
        loadable model) or Unavailable (the execution provider failed), from
        onnxruntime's error."""
        try:
            return ort.InferenceSession(
                str(path), self.options(threads), providers=list(self.providers)
            )
        except Exception as exc:  # onnxruntime raises several unrelated types here
            if self._fallback and not isinstance(exc, _LOAD_ERRORS):
                log.warning("%s: %s failed (%s); using the CPU provider", path, self.providers, exc)
                try:
                    return ort.InferenceSession(
                        str(path), self.options(threads), providers=["CPUExecutionProvider"]
                    )
                except Exception as retry:
                    raise _load_error(path, retry) from retry
            raise _load_error(path, exc) from exc


def _load_error(path: Path, exc: Exception) -> AgentdError:
    if isinstance(exc, _DEVICE_ERRORS):
        return Unavailable(f"{path}: the execution provider failed to load it: {exc}")
    return InvalidArgument(f"{path}: not a loadable ONNX model: {exc}")


class OnnxLoader:
    """Loads ``model.onnx`` (a file, or a folder holding one) with the node's
    :class:`SessionFactory` (default: one from ``threads`` and ``providers``)."""

    platform = "onnxruntime"

    def __init__(
        self,
        sessions: SessionFactory | None = None,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self._sessions = sessions or SessionFactory(threads=threads, providers=providers)

    def can_load(self, source: Path) -> bool:
        return _model_file(source).is_file()

    def load(self, source: Path, config: ModelConfig) -> OnnxExecutor:
        return OnnxExecutor(self._sessions.open(_model_file(source)), config)


def _model_file(source: Path) -> Path:
    return source / "model.onnx" if source.is_dir() else source


class OnnxExecutor:
    """Runs one ONNX Runtime session."""

    def __init__(self, session: ort.InferenceSession, config: ModelConfig) -> None:
        self._session = session
        batched = config.batching.max_batch_size > 0
        inputs = _specs(session.get_inputs(), config.inputs, batched, "input")
        outputs = _specs(session.get_outputs(), config.outputs, batched, "output")
        self._metadata = ModelMetadata(
            name=config.name,
            version=config.version,
            platform="onnxruntime",
            inputs=inputs,
            outputs=outputs,
            max_batch_size=config.batching.max_batch_size,
            execution_providers=tuple(session.get_providers()),
            labels=config.labels,
            extra=config.extra,
        )
        self._output_specs = {spec.name: spec for spec in outputs}
        self._output_names = [spec.name for spec in outputs]
        # IOBinding cannot bind string tensors; such models go through session.run.
        self._strings = any(s.datatype is DataType.BYTES for s in (*inputs, *outputs))

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else self._output_names
        try:
            if self._strings:
                return self._run_plain(inputs, names)
            return self._run_bound(inputs, names)
        except AgentdError:
            raise
        except Exception as exc:
            raise run_error(f"model {self._metadata.name!r}", exc) from exc

    def bind_inputs(self, inputs: Mapping[str, np.ndarray]) -> tuple[Any, list[ort.OrtValue]]:
        """An IOBinding over ``inputs`` (no copy for C-contiguous arrays) and its OrtValues."""
        binding = self._session.io_binding()
        values = []
        for name, array in inputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            binding.bind_ortvalue_input(name, value)
            values.append(value)
        return binding, values

    def _run_bound(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, Any]:
        binding, _values = self.bind_inputs(inputs)  # _values keeps the OrtValues alive
        batch = next(iter(inputs.values())).shape[0] if self._metadata.max_batch_size else None
        results: dict[str, np.ndarray] = {}
        allocated_by_ort: list[str] = []
        for name in names:
            spec = self._output_specs[name]
            shape = _known_shape(spec.shape, batch)
            if shape is None:
                binding.bind_output(name, "cpu")
                allocated_by_ort.append(name)
            else:
                out = np.empty(shape, spec.datatype.numpy)
                binding.bind_output(name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
                results[name] = out
        self._session.run_with_iobinding(binding)
        if allocated_by_ort:
            by_name = dict(zip(names, binding.get_outputs(), strict=True))
            for name in allocated_by_ort:
                # Copy: the view would outlive the OrtValue that owns its memory.
                results[name] = by_name[name].numpy().copy()
        return {name: results[name] for name in names}

    def _run_plain(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, Any]:
        feeds = {
            name: _to_onnx_strings(name, a) if a.dtype == object else a
            for name, a in inputs.items()
        }
        values = self._session.run(names, feeds)
        return {
            name: _from_onnx_strings(value) if value.dtype == object else value
            for name, value in zip(names, values, strict=True)
        }

    def close(self) -> None:
        self._session = None


def _specs(
    nodes: Sequence[Any], configured: tuple[TensorSpec, ...] | None, batched: bool, kind: str
) -> tuple[TensorSpec, ...]:
    """Tensor specs from the model, checked against (and shaped by) config.yaml if given."""
    found: dict[str, TensorSpec] = {}
    for node in nodes:
        datatype = _ONNX_TYPES.get(node.type)
        if datatype is None:
            raise InvalidArgument(f"{kind} {node.name!r} has unsupported type {node.type}")
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in node.shape)
        found[node.name] = TensorSpec(node.name, datatype, shape)
    if batched:
        for spec in found.values():
            if not spec.shape or spec.shape[0] != -1:
                raise InvalidArgument(
                    f"max_batch_size > 0 needs a dynamic first dimension, but {kind} "
                    f"{spec.name!r} has shape {list(spec.shape)}"
                )
    if configured is None:
        return tuple(found.values())
    specs = []
    for want in configured:
        have = found.get(want.name)
        if have is None:
            raise InvalidArgument(
                f"config.yaml names {kind} {want.name!r}, which the model does not have "
                f"(it has {sorted(found)})"
            )
        if have.datatype is not want.datatype:
            raise InvalidArgument(
                f"config.yaml says {kind} {want.name!r} is {want.datatype.value}, "
                f"the model says {have.datatype.value}"
            )
        full = (-1, *want.shape) if batched else want.shape
        fits = len(full) == len(have.shape) and all(
            -1 in (m, c) or m == c for m, c in zip(have.shape, full, strict=True)
        )
        if not fits:
            raise InvalidArgument(
                f"config.yaml shape {list(want.shape)} for {kind} {want.name!r} does not fit "
                f"the model's {list(have.shape)}"
            )
        specs.append(TensorSpec(want.name, want.datatype, full))
    return tuple(specs)


def _known_shape(shape: tuple[int, ...], batch: int | None) -> tuple[int, ...] | None:
    dims = list(shape)
    if batch is not None and dims:
        dims[0] = batch
    return None if any(d < 0 for d in dims) else tuple(dims)


def _to_onnx_strings(name: str, array: np.ndarray) -> np.ndarray:
    # ONNX string tensors hold text; BYTES elements must be UTF-8 to cross over.
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        if isinstance(item, bytes | bytearray):
            try:
                flat_out[i] = bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"input {name!r}: element {i} is not UTF-8, which ONNX string tensors need"
                ) from None
        else:
            flat_out[i] = str(item)
    return out


def _from_onnx_strings(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        flat_out[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out
