"""Model repository through the API (tritonclient) and `agentd models`."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from agentd.inference import DataType
from agentd.testing import start_server
from agentd.testing.models import write_identity_model


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory):
    plugins = tmp_path_factory.mktemp("plugins")
    write_identity_model(plugins / "models", "ident", DataType.FP32)
    broken = plugins / "models" / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")
    running = start_server(["--plugins", str(plugins)])
    yield running
    running.stop()


def agentd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_index_shows_states_and_reasons(repo_server):
    client = httpclient.InferenceServerClient(repo_server.target)
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["ident"]["state"] == "READY"
    assert index["decision"]["state"] == "READY"
    assert index["broken"]["state"] == "FAILED"
    assert "not a loadable ONNX model" in index["broken"]["reason"]


def test_metadata_reports_execution_providers(repo_server):
    meta = httpx.get(repo_server.url + "/v2/models/decision").json()
    assert "CPUExecutionProvider" in meta["parameters"]["execution_providers"]


def test_unload_and_load_with_tritonclient(repo_server):
    client = httpclient.InferenceServerClient(repo_server.target)
    client.unload_model("ident")
    assert not client.is_model_ready("ident")
    client.load_model("ident")
    assert client.is_model_ready("ident")


def test_cli_list_load_unload(repo_server):
    out = agentd("models", "--url", repo_server.url)
    assert out.returncode == 0, out.stderr
    assert "decision" in out.stdout and "READY" in out.stdout and "FAILED" in out.stdout
    assert "language models" in out.stdout and "tinylm" in out.stdout
    out = agentd("models", "unload", "ident", "--url", repo_server.url)
    assert out.returncode == 0 and "unloaded" in out.stdout
    out = agentd("models", "load", "ident", "--url", repo_server.url)
    assert out.returncode == 0 and "loaded" in out.stdout
    out = agentd("models", "load", "broken", "--url", repo_server.url)
    assert out.returncode == 1 and "not a loadable ONNX model" in out.stderr
    out = agentd("models", "load", "ghost", "--url", repo_server.url)
    assert out.returncode == 1 and "unknown model" in out.stderr


@pytest.mark.parametrize(
    "path",
    ["/v2/repository/models/load", "/v2/repository/models/unload", "/v2/repository/models//load"],
)
def test_admin_paths_without_a_model_name_are_404(repo_server, path):
    response = httpx.post(repo_server.url + path)
    assert response.status_code == 404
    assert "Traceback" not in repo_server.log()


def test_a_failed_reload_keeps_the_previous_version_serving(tmp_path):
    write_identity_model(tmp_path / "models", "mine", DataType.FP32)
    running = start_server(["--plugins", str(tmp_path)])
    try:
        client = httpclient.InferenceServerClient(running.target)

        def infer() -> list[float]:
            tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
            return client.infer("mine", [tensor]).as_numpy("OUTPUT0").ravel().tolist()

        assert infer() == [0.0, 1.0, 2.0, 3.0]
        model_file = tmp_path / "models" / "mine" / "model.onnx"
        good = model_file.read_bytes()
        model_file.write_bytes(b"not a model any more")
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("mine")
        assert "not a loadable ONNX model" in str(caught.value)
        assert "previous version is still served" in str(caught.value)
        assert client.is_model_ready("mine") and infer() == [0.0, 1.0, 2.0, 3.0]
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["mine"]["state"] == "READY" and "reload failed" in index["mine"]["reason"]
        model_file.write_bytes(good)
        client.load_model("mine")
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["mine"]["reason"] == "" and infer() == [0.0, 1.0, 2.0, 3.0]
    finally:
        running.stop()


@pytest.mark.parametrize("name", ["decision?x=1", "a/b", "ghost#x"])
def test_cli_names_are_one_path_segment(repo_server, name):
    out = agentd("models", "load", name, "--url", repo_server.url)
    assert out.returncode == 1
    assert f"unknown model {name!r}" in out.stderr, out.stderr


def test_cli_refuses_dot_names(repo_server):
    out = agentd("models", "unload", "..", "--url", repo_server.url)
    assert out.returncode == 2 and "not a model name" in out.stderr
