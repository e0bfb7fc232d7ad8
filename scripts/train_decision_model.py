#!/usr/bin/env python3
"""Train, export and quantize agentd's built-in ``decision`` model.

Everything is generated here, so the model is reproducible and license-clean:

1. a synthetic dataset: 16 FP32 features describing an agent's situation, labelled with one
   of four actions by a hidden rule set (``label_rule``) plus a little label noise;
2. a 16 -> 64 -> 32 -> 4 ReLU MLP trained with plain numpy (manual backward pass, Adam);
3. an fp32 ONNX export (``features`` -> ``probabilities``, ``action``);
4. static int8 quantization (QDQ, per-channel weights) with onnxruntime;
5. fp32 / int8 accuracy on the test split, written into ``config.yaml``.

Run from the repository root (under 10 s on two CPU cores)::

    python scripts/train_decision_model.py [--fp32-out /tmp/decision-fp32.onnx]

Outputs ``src/agentd/models/decision/model.onnx`` (int8) and ``config.yaml`` beside it.
``make_dataset`` is importable (tests load this file with importlib to rebuild the test set).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "agentd" / "models" / "decision"

SEED = 20240607
TRAIN_SAMPLES = 60_000
VALIDATION_SAMPLES = 10_000
TEST_SAMPLES = 20_000
# Each split has its own seed so that any one of them can be rebuilt alone.
TRAIN_SEED_OFFSET, VALIDATION_SEED_OFFSET, TEST_SEED_OFFSET = 0, 1, 2

LABEL_NOISE = 0.05  # share of samples whose label is redrawn uniformly at random
EPOCHS = 100  # ~6 s on two cores; validation accuracy still creeps up until ~100
BATCH_SIZE = 256
LEARNING_RATE = 3e-3
HIDDEN = (64, 32)
CALIBRATION_SAMPLES = 4096
OPSET = 17

ACTIONS = ("wait", "explore", "exploit", "retreat")
FEATURES = (
    "energy",  # 0: battery / stamina left
    "health",  # 1
    "goal_distance",  # 2: distance to the current goal, normalized
    "threat",  # 3: strongest nearby threat
    "resources_nearby",  # 4: density of collectable resources in view
    "carried",  # 5: how full the agent's inventory is
    "neighbours",  # 6: crowding, normalized neighbour count
    "ally_ratio",  # 7: share of neighbours that are allies
    "time_of_day",  # 8: 0 = midnight ... 0.5 = noon; > 0.75 counts as night
    "visibility",  # 9
    "explored",  # 10: fraction of the map already explored
    "cooldown",  # 11: time until the agent's last action recharges
    "noise_0",  # 12-15: distractor sensors, independent of the label
    "noise_1",
    "noise_2",
    "noise_3",
)
N_FEATURES = len(FEATURES)
WAIT, EXPLORE, EXPLOIT, RETREAT = range(len(ACTIONS))


# --------------------------------------------------------------------------- data


def label_rule(x: np.ndarray) -> np.ndarray:
    """The hidden rule set: the noise-free action for each row of ``x`` (shape [n, 16]).

    Later rules override earlier ones, so the priority is retreat > wait > exploit > explore.
    """
    energy, health, dist, threat, res, carried, neigh, ally, tod, vis, explored, cool = x[:, :12].T

    # Danger grows with the threat, shrinks with allied support and with the agent's health.
    danger = threat * (1.25 - ally) * (1.2 - 0.6 * health)
    retreat = (danger > 0.5) | ((health < 0.15) & (threat > 0.4))

    # Rest when exhausted, or when the last action is still recharging and energy is low-ish.
    wait = (energy < 0.2) | ((cool > 0.8) & (energy < 0.6))

    # Resources are worth taking when the expected gain beats a distance-dependent threshold:
    # night halves visibility, a full inventory and crowding (sharing) reduce the gain.
    sight = vis * np.where(tod > 0.75, 0.5, 1.0)
    gain = res * (0.4 + 0.6 * sight) * (1.0 - carried) * (1.0 - 0.4 * neigh)
    exploit = gain > 0.08 + 0.15 * dist

    # Nothing left to explore and nothing to exploit: waiting is the sensible default.
    stale = (explored > 0.85) & ~exploit

    y = np.full(len(x), EXPLORE, dtype=np.int64)
    y[exploit] = EXPLOIT
    y[stale | wait] = WAIT
    y[retreat] = RETREAT
    return y


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples: features float32 [n, 16] uniform in [0, 1), labels int64 [n].

    All features share the [0, 1) range on purpose: the int8 model quantizes its input with one
    scale, and a feature with a wider range would cost the others resolution.
    """
    rng = np.random.default_rng(seed)
    x = rng.random((n, N_FEATURES), dtype=np.float32)
    y = label_rule(x)
    noisy = rng.random(n) < LABEL_NOISE
    y[noisy] = rng.integers(0, len(ACTIONS), size=int(noisy.sum()))
    return x, y


def make_splits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        "train": make_dataset(TRAIN_SAMPLES, seed + TRAIN_SEED_OFFSET),
        "validation": make_dataset(VALIDATION_SAMPLES, seed + VALIDATION_SEED_OFFSET),
        "test": make_dataset(TEST_SAMPLES, seed + TEST_SEED_OFFSET),
    }


# --------------------------------------------------------------------------- model


@dataclass
class Mlp:
    """Dense layers ``weights[i]`` [in, out] and ``biases[i]`` [out]; ReLU between them."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]

    @classmethod
    def init(cls, sizes: Sequence[int], rng: np.random.Generator) -> Mlp:
        # He initialization keeps activations from shrinking or exploding through the ReLUs.
        weights = [
            rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out)).astype(np.float32)
            for fan_in, fan_out in pairwise(sizes)
        ]
        biases = [np.zeros(fan_out, dtype=np.float32) for fan_out in sizes[1:]]
        return cls(weights, biases)

    def params(self) -> list[np.ndarray]:
        return [*self.weights, *self.biases]

    def copy(self) -> Mlp:
        return Mlp([w.copy() for w in self.weights], [b.copy() for b in self.biases])

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits, and the input of every layer (kept for the backward pass)."""
        inputs = []
        h = x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            inputs.append(h)
            h = h @ w + b
            if i < last:
                h = np.maximum(h, 0.0)
        return h, inputs

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[0].argmax(axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def gradients(model: Mlp, x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """Mean cross-entropy loss and its gradient for each of ``model.params()``."""
    logits, inputs = model.forward(x)
    probs = softmax(logits)
    n = len(x)
    loss = float(-np.log(probs[np.arange(n), y] + 1e-12).mean())

    delta = probs
    delta[np.arange(n), y] -= 1.0
    delta /= n
    grad_w: list[np.ndarray] = [np.empty(0)] * len(model.weights)
    grad_b: list[np.ndarray] = [np.empty(0)] * len(model.biases)
    for i in reversed(range(len(model.weights))):
        grad_w[i] = inputs[i].T @ delta
        grad_b[i] = delta.sum(axis=0)
        if i > 0:
            # inputs[i] is the ReLU output of layer i-1: the gradient only passes where it is > 0.
            delta = (delta @ model.weights[i].T) * (inputs[i] > 0)
    return loss, [*grad_w, *grad_b]


class Adam:
    def __init__(self, params: list[np.ndarray], lr: float) -> None:
        self.params = params
        self.lr = lr
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        correction1 = 1.0 - self.beta1**self.t
        correction2 = 1.0 - self.beta2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * g * g
            # In place, so the model's arrays themselves are updated.
            p -= (self.lr * (m / correction1) / (np.sqrt(v / correction2) + self.eps)).astype(
                p.dtype
            )


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        return cls(x.mean(axis=0), x.std(axis=0) + 1e-6)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


def train(
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int, epochs: int
) -> tuple[Mlp, Standardizer, list[str]]:
    """Mini-batch Adam with a cosine learning-rate decay; returns the best model on validation."""
    rng = np.random.default_rng(seed)
    x_train, y_train = splits["train"]
    x_val, y_val = splits["validation"]
    scaler = Standardizer.fit(x_train)
    xs, xv = scaler(x_train), scaler(x_val)

    model = Mlp.init((N_FEATURES, *HIDDEN, len(ACTIONS)), rng)
    optimizer = Adam(model.params(), LEARNING_RATE)
    best, best_acc, log = model.copy(), -1.0, []
    for epoch in range(epochs):
        optimizer.lr = LEARNING_RATE * 0.5 * (1.0 + np.cos(np.pi * epoch / epochs))
        order = rng.permutation(len(xs))
        losses = []
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            loss, grads = gradients(model, xs[batch], y_train[batch])
            optimizer.step(grads)
            losses.append(loss)
        val_acc = float((model.predict(xv) == y_val).mean())
        log.append(f"epoch {epoch + 1:2d}  loss {np.mean(losses):.4f}  val acc {val_acc:.4f}")
        if val_acc > best_acc:
            best, best_acc = model.copy(), val_acc
    return best, scaler, log


def fold_standardizer(model: Mlp, scaler: Standardizer) -> Mlp:
    """The same function on raw features: (x - mean) / std @ W + b == x @ W' + b'.

    Folding keeps the exported graph to plain dense layers, and lets the quantizer see the raw
    [0, 1) inputs rather than a standardized copy.
    """
    folded = model.copy()
    w0 = model.weights[0] / scaler.std[:, None]
    folded.weights[0] = w0.astype(np.float32)
    folded.biases[0] = (model.biases[0] - scaler.mean @ w0).astype(np.float32)
    return folded


# --------------------------------------------------------------------------- ONNX


def dense_graph(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    input_name: str,
    output_name: str,
    prefix: str = "dense",
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Gemm nodes, with a Relu after each but the last, for an MLP; returns nodes, initializers.

    Weights are stored transposed ([out, in], ``transB=1``) so that per-channel quantization runs
    along axis 0, one scale per output unit.
    """
    nodes, inits = [], []
    current = input_name
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        w_name, b_name = f"{prefix}{i}.weight", f"{prefix}{i}.bias"
        out = output_name if i == last else f"{prefix}{i}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T, dtype=np.float32), w_name))
        inits.append(numpy_helper.from_array(b.astype(np.float32), b_name))
        nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [out], transB=1))
        if i < last:
            nodes.append(helper.make_node("Relu", [out], [f"{out}.relu"]))
            out = f"{out}.relu"
        current = out
    return nodes, inits


def export_onnx(model: Mlp) -> onnx.ModelProto:
    logits = "logits"
    nodes, inits = dense_graph(model.weights, model.biases, "features", logits)
    nodes += [
        helper.make_node("Softmax", [logits], ["probabilities"], axis=1),
        # ArgMax of the logits equals that of the probabilities, and does not wait on Softmax.
        helper.make_node("ArgMax", [logits], ["action"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "decision",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", N_FEATURES])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("action", TensorProto.INT64, ["batch"]),
        ],
        initializer=inits,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="agentd/scripts/train_decision_model.py",
        doc_string="agentd decision model: 16 situation features -> one of " + ", ".join(ACTIONS),
    )
    proto.ir_version = 8  # readable by every onnxruntime since 1.10
    onnx.checker.check_model(proto, full_check=True)
    return proto


def quantize(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Static int8 quantization in QDQ format, weights per output channel.

    Static rather than dynamic: the activation ranges come from calibration data, so there is no
    per-call range computation, and the QDQ graph runs anywhere onnxruntime does.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray, batch: int = 512) -> None:
            self.batches: Iterator[np.ndarray] = iter(np.array_split(x, max(1, len(x) // batch)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"features": batch}

    # Shape inference and graph clean-up first, as onnxruntime recommends (and warns without).
    prepared = fp32_path.with_suffix(".prepared.onnx")
    # Symbolic shape inference (needs sympy) adds nothing here: only the batch dim is symbolic.
    quant_pre_process(fp32_path, prepared, skip_optimization=True, skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(int8_path),
        Reader(calibration),
        quant_format=QuantFormat.QDQ,
        # Softmax and ArgMax stay in float: 8-bit probabilities would be too coarse for callers.
        op_types_to_quantize=["Gemm", "Relu"],
        per_channel=True,
        # Signed int8 activations and weights (S8S8) are onnxruntime's recommended QDQ default.
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def evaluate(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's chosen action for each row of ``x``."""
    _, action = session(path).run(["probabilities", "action"], {"features": x})
    return action


# --------------------------------------------------------------------------- config.yaml


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    # Plain style only where YAML reads it back as the same string ("1", "yes"... are not).
    if re.fullmatch(r"[A-Za-z_][\w./-]*( [\w./-]+)*", text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text)


def _flow(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return _scalar(value)


def render_config(
    name: str,
    max_batch_size: int,
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    *,
    version: str = "1",
    max_queue_delay_us: int = 500,
    max_queue_size: int = 65536,
    labels: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A model repository ``config.yaml``, laid out as docs/models.md describes.

    Written by hand rather than with ``yaml.dump`` to keep the documented layout and comments;
    the text is parsed back and compared before it is returned.
    """
    lines = [
        f"name: {_scalar(name)}",
        f"version: {json.dumps(str(version))}",
        "platform: onnxruntime",
        f"max_batch_size: {max_batch_size}  # 0 would mean: no batch dimension",
        "dynamic_batching:",
        f"  max_queue_delay_us: {max_queue_delay_us}",
        f"  max_queue_size: {max_queue_size}",
        "inputs:  # shapes exclude the batch dimension",
        *(f"  - {_flow(spec)}" for spec in inputs),
        "outputs:",
        *(f"  - {_flow(spec)}" for spec in outputs),
    ]
    if labels:
        lines.append(f"labels: {_flow(list(labels))}")
    if extra:
        lines.append("extra:")
        lines += [f"  {key}: {_flow(value)}" for key, value in extra.items()]
    text = "\n".join(lines) + "\n"

    expected = {
        "name": name,
        "version": str(version),
        "platform": "onnxruntime",
        "max_batch_size": max_batch_size,
        "dynamic_batching": {
            "max_queue_delay_us": max_queue_delay_us,
            "max_queue_size": max_queue_size,
        },
        "inputs": [dict(s) for s in inputs],
        "outputs": [dict(s) for s in outputs],
        **({"labels": list(labels)} if labels else {}),
        **({"extra": json.loads(json.dumps(extra))} if extra else {}),
    }
    parsed = yaml.safe_load(text)
    if json.loads(json.dumps(parsed)) != json.loads(json.dumps(expected)):
        raise AssertionError(f"config.yaml does not read back as written:\n{text}")
    return text


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="%(default)s")
    parser.add_argument("--fp32-out", type=Path, help="also keep the fp32 model at this path")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("-v", "--verbose", action="store_true", help="print every epoch")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    splits = make_splits(args.seed)
    model, scaler, log = train(splits, args.seed, args.epochs)
    if args.verbose:
        print("\n".join(log))
    trained = time.perf_counter()
    exported = export_onnx(fold_standardizer(model, scaler))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    int8_path = args.out_dir / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "decision-fp32.onnx"
        onnx.save(exported, fp32_path)
        x_train = splits["train"][0]
        quantize(fp32_path, int8_path, x_train[:CALIBRATION_SAMPLES])
        x_test, y_test = splits["test"]
        fp32_pred, int8_pred = evaluate(fp32_path, x_test), evaluate(int8_path, x_test)
        if args.fp32_out:
            args.fp32_out.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(exported, args.fp32_out)
    onnx.checker.check_model(onnx.load(int8_path))

    accuracy = {
        "fp32": round(float((fp32_pred == y_test).mean()), 4),
        "int8": round(float((int8_pred == y_test).mean()), 4),
        "agreement": round(float((fp32_pred == int8_pred).mean()), 4),
        "test_samples": len(y_test),
        "test_seed": args.seed + TEST_SEED_OFFSET,
    }
    (args.out_dir / "config.yaml").write_text(decision_config(args.seed, args.epochs, accuracy))

    total = time.perf_counter() - started
    print(f"trained {args.epochs} epochs in {trained - started:.1f} s, total {total:.1f} s")
    print(f"noise-free test labels: {(label_rule(x_test) == y_test).mean():.4f} (the ceiling)")
    print(
        f"accuracy fp32 {accuracy['fp32']:.4f}  int8 {accuracy['int8']:.4f}  "
        f"agreement {accuracy['agreement']:.4f}  on {len(y_test)} test samples"
    )
    print(f"wrote {int8_path} ({int8_path.stat().st_size} bytes) and config.yaml")
    if args.fp32_out:
        print(f"wrote {args.fp32_out} ({args.fp32_out.stat().st_size} bytes)")
    return 0


def decision_config(seed: int, epochs: int, accuracy: Mapping[str, Any]) -> str:
    return render_config(
        "decision",
        4096,
        [{"name": "features", "datatype": "FP32", "shape": [N_FEATURES]}],
        [
            {"name": "probabilities", "datatype": "FP32", "shape": [len(ACTIONS)]},
            {"name": "action", "datatype": "INT64", "shape": []},
        ],
        labels=ACTIONS,
        extra={
            "description": (
                "Picks an agent's next action from 16 situation features; "
                "int8 MLP 16-64-32-4 trained on synthetic data (docs/models.md)."
            ),
            "training": {
                "script": "scripts/train_decision_model.py",
                "seed": seed,
                "samples": TRAIN_SAMPLES,
                "epochs": epochs,
            },
            "quantization": {
                "method": "static QDQ int8",
                "calibration_samples": CALIBRATION_SAMPLES,
            },
            "accuracy": dict(accuracy),
        },
    )


if __name__ == "__main__":
    sys.exit(main())
