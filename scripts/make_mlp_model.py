#!/usr/bin/env python3
"""Write a larger fp32 MLP with seeded random weights, for inference benchmarks.

The model computes nothing useful; it exists to have a realistic amount of arithmetic per row
(about 2 x 3.4 M multiply-adds with the defaults)::

    python scripts/make_mlp_model.py --inputs 256 --hidden 1024 --layers 4 --outputs 16 -o DIR

writes ``DIR/model.onnx`` (input ``input`` FP32 [batch, inputs], output ``output`` FP32
[batch, outputs]) and ``DIR/config.yaml`` named after the folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

# The sibling script owns the ONNX layer builder and the config.yaml writer; when this file
# runs as a script its folder is first on sys.path.
from train_decision_model import OPSET, dense_graph, render_config


def random_layers(
    sizes: Sequence[int], rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """He-initialized weights [in, out] and small biases, so activations neither vanish nor
    overflow through deep stacks (a benchmark of NaNs or zeros could hit fast paths)."""
    weights, biases = [], []
    for fan_in, fan_out in pairwise(sizes):
        weights.append(rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out)).astype(np.float32))
        biases.append(rng.normal(0.0, 0.01, fan_out).astype(np.float32))
    return weights, biases


def build_model(
    inputs: int, hidden: int, layers: int, outputs: int, seed: int, name: str
) -> onnx.ModelProto:
    sizes = [inputs, *([hidden] * layers), outputs]
    weights, biases = random_layers(sizes, np.random.default_rng(seed))
    nodes, inits = dense_graph(weights, biases, "input", "output")
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", outputs])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="agentd/scripts/make_mlp_model.py",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=256, help="input width (%(default)s)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden width (%(default)s)")
    parser.add_argument("--layers", type=int, default=4, help="hidden layers (%(default)s)")
    parser.add_argument("--outputs", type=int, default=16, help="output width (%(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out-dir", type=Path, required=True, help="e.g. models/mlp")
    args = parser.parse_args(argv)
    for option in ("inputs", "hidden", "outputs", "max_batch_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.layers < 0:
        parser.error("--layers must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    name = out_dir.resolve().name
    model = build_model(args.inputs, args.hidden, args.layers, args.outputs, args.seed, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out_dir / "model.onnx")
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    config = render_config(
        name,
        args.max_batch_size,
        [{"name": "input", "datatype": "FP32", "shape": [args.inputs]}],
        [{"name": "output", "datatype": "FP32", "shape": [args.outputs]}],
        extra={
            "description": "Random-weight fp32 MLP for inference benchmarks; outputs are noise.",
            "generator": {
                "script": "scripts/make_mlp_model.py",
                "seed": args.seed,
                "inputs": args.inputs,
                "hidden": args.hidden,
                "layers": args.layers,
                "outputs": args.outputs,
                "parameters": params,
            },
        },
    )
    (out_dir / "config.yaml").write_text(config)
    size = (out_dir / "model.onnx").stat().st_size
    print(f"wrote {out_dir / 'model.onnx'} ({params} parameters, {size} bytes) and config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
