"""Baseline: an MLServer custom runtime that serves an ONNX model with onnxruntime.

This file runs inside MLServer's own virtual environment (MLServer 1.7 pins an older protobuf
and FastAPI than agentd), so it imports nothing from agentd. The inference benchmark copies it
next to each model's ``model-settings.json``, whose ``implementation`` is
``mlserver_onnx.OnnxModel`` and whose ``parameters.uri`` names the ``.onnx`` file.

It is written the way MLServer's documentation shows custom runtimes: one session created in
``load()``, inputs decoded and outputs encoded with MLServer's ``NumpyCodec``. MLServer's
adaptive batching (``max_batch_size`` / ``max_batch_time`` in model-settings.json) stacks
concurrent requests along the first dimension before ``predict()`` sees them.

By default ``predict()`` runs the session on the event loop, as MLServer's own runtimes
(mlserver-sklearn, mlserver-xgboost) do. ``parameters.extra.offload: true`` runs it in a worker
thread instead; on a 2-core machine neither setting was consistently faster.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

__all__ = ["OnnxModel"]


class OnnxModel(MLModel):
    """One onnxruntime CPU session per model; every output of the graph is returned."""

    async def load(self) -> bool:
        path = await get_model_uri(self.settings, wellknown_filenames=["model.onnx"])
        options = ort.SessionOptions()
        # As agentd configures its sessions: all cores inside an operator, one graph thread.
        options.intra_op_num_threads = os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._input_names = {i.name for i in self._session.get_inputs()}
        self._output_names = [o.name for o in self._session.get_outputs()]
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        self._offload = bool(extra.get("offload", False))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds: dict[str, np.ndarray] = {}
        for request_input in payload.inputs:
            if request_input.name not in self._input_names:
                raise ValueError(
                    f"unknown input {request_input.name!r}; the model takes "
                    f"{sorted(self._input_names)}"
                )
            feeds[request_input.name] = NumpyCodec.decode_input(request_input)
        if self._offload:
            results = await asyncio.to_thread(self._session.run, self._output_names, feeds)
        else:
            results = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output(name, np.asarray(value))
                for name, value in zip(self._output_names, results, strict=True)
            ],
        )
