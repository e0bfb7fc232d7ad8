"""A tool file written into a running ``agentd serve``'s plugin folder is built by the node
and answers: the node runs inside Envoy (pyvoy's embedded Python), where ``sys.executable``
is the first ``python3`` on PATH rather than this environment's interpreter, and the build
must still run componentize-py from this environment."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx

from agentd.testing import start_server
from tests.conftest import metric_value

CALL_TOOL = "/agentd.v1.AgentService/CallTool"
BUILD_TIMEOUT_S = 300  # one componentize-py build and precompile: 10-25 s on an idle machine


def test_a_tool_file_written_to_a_running_serve_is_built_and_answers(tmp_path: Path) -> None:
    (tmp_path / "tools").mkdir()
    server = start_server(["--plugins", str(tmp_path)])
    try:
        # Content new to the tools cache (this run's own version): the node must build it.
        version = uuid.uuid4().hex
        tmp = tmp_path / "tools" / ".served_version.py.tmp"
        tmp.write_text(
            f"VERSION = {version!r}\n\n\ndef served_version() -> str:\n"
            '    """The version of this file."""\n    return VERSION\n'
        )
        tmp.replace(tmp_path / "tools" / "served_version.py")
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while True:
                r = http.post(CALL_TOOL, json={"name": "served_version", "argumentsJson": "{}"})
                if r.status_code == 200:
                    break
                metrics = http.get("/metrics").text
                failed = metric_value(
                    metrics, "agentd_plugin_reloads_total", kind="tools", outcome="failed"
                )
                # A failed build ends the wait, with the server's reason.
                assert failed == 0, "".join(server.output)[-2000:]
                assert time.monotonic() < deadline, "the tool was not built in time"
                time.sleep(0.2)
        assert json.loads(r.json()["resultJson"]) == version
    finally:
        server.stop()
