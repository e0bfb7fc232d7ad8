"""No raw llama.cpp or torch error leaves a language-model backend: load and evaluation
failures are agentd errors with the library's exception chained as ``__cause__``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from agentd.errors import Internal, InvalidArgument

REPO = Path(__file__).resolve().parents[2]
HF_DIR = REPO / "models" / "tinylm" / "hf"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    from agentd.generate.gguf_export import export_gguf

    return export_gguf(HF_DIR, tmp_path_factory.mktemp("gguf") / "model.f32.gguf", "f32")


def test_a_corrupt_gguf_file_is_invalid_argument_caused_by_llama_cpp(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from agentd.generate.gguf_backend import load_gguf

    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 512)
    expected = re.escape(f"cannot load GGUF model {path}")
    with pytest.raises(InvalidArgument, match=expected) as caught:
        load_gguf(path, "corrupt")
    assert isinstance(caught.value.__cause__, ValueError)  # llama-cpp-python's own error


def test_a_failed_llama_cpp_evaluation_is_internal(gguf_file: Path) -> None:
    pytest.importorskip("llama_cpp")
    from agentd.generate.gguf_backend import GGUFBackend

    backend = GGUFBackend(gguf_file, "tiny", n_ctx=64)
    try:
        backend.prefill([2, 3])
        # The generator checks ids against the vocabulary; the backend alone does not.
        with pytest.raises(Internal, match=r"model 'tiny': llama\.cpp failed: Runtime") as caught:
            backend.decode(10**6)
        assert isinstance(caught.value.__cause__, RuntimeError)
        with pytest.raises(Internal, match=r"llama\.cpp failed") as caught:
            backend.prefill(list(range(2, 80)))  # longer than the context of 64
        assert caught.value.__cause__ is not None
        # ... and the model still works.
        assert backend.prefill([2, 3]).shape == (backend.info.vocab_size,)
    finally:
        backend.close()


def copy_of_tinylm(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(HF_DIR, folder)
    return folder


def test_an_hf_folder_with_a_broken_config_is_invalid_argument(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from agentd.generate.hf_backend import load_hf

    folder = copy_of_tinylm(tmp_path)
    (folder / "config.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="cannot load Hugging Face model") as caught:
        load_hf(folder, "broken")
    assert caught.value.__cause__ is not None
    assert not isinstance(caught.value.__cause__, InvalidArgument)


def test_an_hf_folder_without_weights_is_invalid_argument(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from agentd.generate.hf_backend import load_hf

    folder = copy_of_tinylm(tmp_path)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(InvalidArgument, match="cannot load Hugging Face model") as caught:
        load_hf(folder, "empty")
    assert isinstance(caught.value.__cause__, OSError)


def test_hf_corrupt_weights_are_invalid_argument(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from agentd.generate.hf_backend import load_hf

    folder = copy_of_tinylm(tmp_path)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(InvalidArgument, match="cannot load Hugging Face model") as caught:
        load_hf(folder, "corrupt")
    assert caught.value.__cause__ is not None


def test_a_failed_forward_pass_is_internal_caused_by_torch() -> None:
    pytest.importorskip("transformers")
    from agentd.generate.hf_backend import HFBackend

    backend = HFBackend(HF_DIR, "tiny")
    try:
        backend.prefill([2, 3])
        with pytest.raises(Internal, match="model 'tiny': the forward pass failed") as caught:
            backend.decode(backend.info.vocab_size + 100)
        assert isinstance(caught.value.__cause__, IndexError)  # torch's embedding lookup
    finally:
        backend.close()
