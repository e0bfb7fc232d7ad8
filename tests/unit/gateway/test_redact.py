"""public_message: server file paths out of client-facing errors, request paths kept."""

import os
import sys
import tempfile

from agentd.gateway.redact import public_message


def test_server_paths_are_cut_to_their_last_component():
    folder = os.path.join(tempfile.gettempdir(), "plugins", "models", "broken")
    model = os.path.join(folder, "model.onnx")
    message = (
        f"{model}: not a loadable ONNX model: [ONNXRuntimeError] : 7 : INVALID_PROTOBUF : "
        f"Load model from {model} failed:Protobuf parsing failed."
    )
    public = public_message(message)
    assert tempfile.gettempdir() not in public and "plugins" not in public
    assert public.startswith("\u2026/model.onnx: not a loadable ONNX model")
    assert "Load model from \u2026/model.onnx failed" in public
    assert public_message(f"'{folder}/config.yaml': bad") == "'\u2026/config.yaml': bad"
    assert sys.prefix not in public_message(f"cannot import ({sys.prefix}/lib/x.py)")


def test_request_paths_urls_and_plain_text_are_kept():
    for message in [
        "no route for /v2/whatever",
        "unknown method /agentd.v1.AgentService/Nope",
        "see http://127.0.0.1:8080/v2/models/x for details",
        "a/b is not a model name",
        "ratio 3/4 of the rows",
        "nothing to redact",
        "/",
    ]:
        assert public_message(message) == message


def test_a_path_right_after_a_colon_is_cut_too():
    path = os.path.join(tempfile.gettempdir(), "agentd", "config.yaml")
    assert public_message(f"file:{path}") == "file:\u2026/config.yaml"
