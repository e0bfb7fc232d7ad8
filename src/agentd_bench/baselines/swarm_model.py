"""The built-in decision model as a plain ONNX Runtime session, for the swarm baselines."""

from __future__ import annotations

from importlib import resources

import onnxruntime as ort

__all__ = ["decision_session"]


def decision_session() -> ort.InferenceSession:
    path = resources.files("agentd.models") / "decision" / "model.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one row at a time: threads only add hand-offs
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
