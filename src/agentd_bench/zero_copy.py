"""In-process microbenchmark: a 4 MB FP32 tensor from a request buffer into an ONNX session.

Two ways from the bytes of a request body to a session input:

* zero-copy (agentd): ``np.frombuffer`` view over the body, then
  :meth:`agentd.inference.onnx_runtime.OnnxExecutor.bind_inputs` (``OrtValue`` over the same
  memory, bound with IOBinding) - no byte of the tensor is moved;
* copying (what servers commonly do): decode into a new array (``np.frombuffer(...).copy()``),
  then the same binding; and, for reference, MLServer's raw-contents decoding (``struct``
  unpack to a list, then ``np.array``).

Measured twice: the input path alone, and a full run of a ReduceSum model (the output is one
number, so output handling does not hide the input path). The copying full run uses
``session.run`` with a numpy feed, as a typical server does.
Run directly with ``python -m agentd_bench.zero_copy [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ELEMENTS", "FULL", "QUICK", "ZeroCopyConfig", "build_reduce_model", "measure"]

ELEMENTS = 1 << 20  # 1M float32 = 4 MiB
INPUT = "x"
OUTPUT = "sum"
SPEEDUP_TARGET = 5.0


@dataclass(frozen=True, slots=True)
class ZeroCopyConfig:
    """Iterations per variant; the median of the per-iteration times is reported."""

    fast_iterations: int  # sub-millisecond variants
    slow_iterations: int  # the list-decoding reference, ~0.1 s each


FULL = ZeroCopyConfig(fast_iterations=1000, slow_iterations=5)
QUICK = ZeroCopyConfig(fast_iterations=200, slow_iterations=2)


def build_reduce_model(path: Path, elements: int = ELEMENTS) -> None:
    """``sum = ReduceSum(x, axis 1, keepdims)``: x FP32 [batch, elements] -> [batch, 1]."""
    import onnx
    from onnx import TensorProto, helper

    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", [INPUT, "axes"], [OUTPUT], keepdims=1)],
        "reduce_sum_4mb",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", elements])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 1])],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _median_us(fn: Callable[[], Any], iterations: int) -> float:
    fn()  # warm: first-call allocations and lazy initialisation
    times = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000.0


def _assert_zero_copy(body: bytes, view: np.ndarray, values: list[Any]) -> None:
    """The bound OrtValue must point into the request body itself, not at a copy of it."""
    whole = np.frombuffer(body, dtype=np.uint8)
    if not np.shares_memory(view, whole):
        raise AssertionError("zero-copy path: the input array does not view the request body")
    if values[0].data_ptr() != view.ctypes.data:
        raise AssertionError("zero-copy path: the bound OrtValue does not use the array's memory")


def measure(config: ZeroCopyConfig, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Time every variant; return the numbers, ratios and the target verdict."""
    import onnxruntime as ort

    from agentd.inference.onnx_runtime import OnnxLoader
    from agentd.inference.types import BatchingConfig, ModelConfig

    threads = os.cpu_count() or 1
    values = np.random.default_rng(0).standard_normal((1, ELEMENTS)).astype("<f4")
    # A request body: a few header bytes, then the tensor, as in a KServe binary request.
    prefix = b'{"inputs":[]}' + b" " * 3  # 16 bytes keep the tensor 4-byte aligned
    body = prefix + values.tobytes()
    offset = len(prefix)
    expected = float(values.astype(np.float64).sum())

    with tempfile.TemporaryDirectory(prefix="agentd-zero-copy-") as tmp:
        path = Path(tmp, "model.onnx")
        build_reduce_model(path)
        config_ = ModelConfig(name="reduce", batching=BatchingConfig(max_batch_size=1))
        executor = OnnxLoader(threads=threads).load(path, config_)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def view() -> np.ndarray:
        return np.frombuffer(body, dtype="<f4", count=ELEMENTS, offset=offset).reshape(1, ELEMENTS)

    def copied() -> np.ndarray:
        return view().copy()

    def listed() -> np.ndarray:
        # MLServer 1.7 turns gRPC raw_input_contents into a list, then np.array(list).
        items = struct.unpack_from(f"<{ELEMENTS}f", body, offset)
        return np.array(list(items), dtype=np.float32).reshape(1, ELEMENTS)

    # Sanity first: the zero-copy path really shares memory, and both paths compute the same.
    zc_array = view()
    _binding, zc_values = executor.bind_inputs({INPUT: zc_array})
    _assert_zero_copy(body, zc_array, zc_values)
    got_zc = float(executor.run({INPUT: view()})[OUTPUT][0, 0])
    got_copy = float(session.run([OUTPUT], {INPUT: copied()})[0][0, 0])
    for got in (got_zc, got_copy):
        if abs(got - expected) > 1e-3 * max(1.0, abs(expected)):
            raise AssertionError(f"reduce model returned {got}, expected {expected}")

    n, slow = config.fast_iterations, config.slow_iterations
    progress("zero-copy: input path")
    input_zero_copy = _median_us(lambda: executor.bind_inputs({INPUT: view()}), n)
    input_copy = _median_us(lambda: executor.bind_inputs({INPUT: copied()}), n)
    input_list = _median_us(lambda: executor.bind_inputs({INPUT: listed()}), slow)
    progress("zero-copy: full run")
    run_zero_copy = _median_us(lambda: executor.run({INPUT: view()}), n)
    run_copy = _median_us(lambda: session.run([OUTPUT], {INPUT: copied()}), n)
    executor.close()

    input_ratio = input_copy / input_zero_copy
    return {
        "tensor": {"datatype": "FP32", "shape": [1, ELEMENTS], "bytes": ELEMENTS * 4},
        "model": "ReduceSum over axis 1 (output [1, 1]), onnxruntime CPU, "
        f"intra-op threads {threads}",
        "method": (
            f"median of {n} timed iterations ({slow} for list decoding) after one warm-up; "
            "input path = request bytes to an IOBinding with the input bound; full run = "
            "input path + run + output"
        ),
        "zero_copy_verified": True,
        "input_path_us": {
            "zero_copy": round(input_zero_copy, 2),
            "copy": round(input_copy, 2),
            "list_decode": round(input_list, 2),
        },
        "full_run_us": {"zero_copy": round(run_zero_copy, 2), "copy": round(run_copy, 2)},
        "speedup": {
            "input_path_vs_copy": round(input_ratio, 2),
            "input_path_vs_list_decode": round(input_list / input_zero_copy, 1),
            "full_run_vs_copy": round(run_copy / run_zero_copy, 2),
        },
        "target": {
            "name": "zero_copy_input_path",
            "description": (
                f"zero-copy input path >= {SPEEDUP_TARGET:g}x faster than copying, 4 MB tensor"
            ),
            "value": round(input_ratio, 2),
            "threshold": SPEEDUP_TARGET,
            "met": input_ratio >= SPEEDUP_TARGET,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="zero-copy input path microbenchmark")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = measure(QUICK if args.quick else FULL, lambda line: print(line, file=sys.stderr))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
