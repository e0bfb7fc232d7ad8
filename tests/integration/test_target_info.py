"""/metrics of a live node carries ``target_info``: the resource its spans carry
(service.name, service.instance.id and what OTEL_RESOURCE_ATTRIBUTES adds) as labels, the
OpenTelemetry convention for joining a target's series to its traces; promtool accepts it."""

from __future__ import annotations

import re
import socket
import subprocess

import httpx

from agentd.testing import start_server
from tests.conftest import PLUGINS, metric_value

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def test_target_info_names_the_nodes_resource() -> None:
    running = start_server(
        ["--plugins", str(PLUGINS)],
        env={
            "OTEL_SERVICE_NAME": "shop",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,team-name=agents",
        },
    )
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            text = client.get("/metrics").text
            open_text = client.get("/metrics", headers={"accept": OPENMETRICS}).text
    finally:
        running.stop()
    # Tracing is off: the resource is the one the node's spans would carry all the same.
    # Its instance: host and pid (the port was 0 when the settings were read).
    found = re.search(r'service_instance_id="([^"]*)"', text)
    assert found is not None, text
    instance = found.group(1)
    assert re.fullmatch(re.escape(socket.gethostname()) + r":pid\d+", instance), instance
    labels = {
        "service_name": "shop",
        "service_instance_id": instance,
        "deployment_environment": "test",
        "team_name": "agents",
    }
    assert "# TYPE target_info gauge" in text
    assert metric_value(text, "target_info", **labels) == 1
    (line,) = [x for x in text.splitlines() if x.startswith("target_info{")]
    assert line.count("=") == len(labels)  # the resource's attributes, nothing else
    # OpenMetrics has an info type: the family is "target".
    assert "# TYPE target info" in open_text
    assert metric_value(open_text, "target_info", **labels) == 1
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""
