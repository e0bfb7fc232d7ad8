from pathlib import Path

import pytest

from agentd.generate.onnx_export import export_onnx
from agentd.testing.lm import write_random_llama


@pytest.fixture(scope="session")
def random_lm(tmp_path_factory) -> Path:
    """A paged ONNX graph of a small random Llama (vocab 64, context 256)."""
    folder = tmp_path_factory.mktemp("random-llama")
    write_random_llama(folder / "hf")
    return export_onnx(folder / "hf", folder / "model.onnx")


@pytest.fixture(scope="session")
def random_lm_dense(random_lm: Path) -> Path:
    return export_onnx(random_lm.parent / "hf", random_lm.parent / "dense.onnx", layout="dense")
