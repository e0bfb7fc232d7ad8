"""Tracing configured the standard way: OTEL_* variables and agentd's own settings."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider

from agentd.errors import ConfigError
from agentd.observability.logs import JsonFormatter
from agentd.observability.tracing import tracing_config
from agentd.settings import Settings, load_settings


def config(env: dict[str, str], **settings: object):
    return tracing_config(Settings(**settings), env)


def test_off_without_an_endpoint() -> None:
    assert not config({}).enabled
    assert not config({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}).enabled


def test_endpoints() -> None:
    # The general endpoint is a base URL; the traces one is used as is; agentd's wins.
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert config(base).endpoint == "http://collector:4318/v1/traces"
    traces = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t:443/custom"}
    assert config(traces).endpoint == "https://t:443/custom"
    assert config(traces, otlp_endpoint="http://mine:4318").endpoint == "http://mine:4318/v1/traces"
    grpc = {**base, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert (config(grpc).protocol, config(grpc).endpoint) == ("grpc", "http://collector:4318/")


def test_headers_sampler_and_resource() -> None:
    c = config(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20x, x-tenant=a",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_SERVICE_NAME": "from-env",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=ignored",
        },
        host="10.0.0.5",
        port=9000,
    )
    assert c.headers == (("authorization", "Bearer x"), ("x-tenant", "a"))
    assert (c.sampler, c.ratio) == ("parentbased_traceidratio", 0.25)
    assert c.resource == {
        "deployment.environment": "prod",
        "service.name": "from-env",
        "service.instance.id": "10.0.0.5:9000",
    }
    # Default: parent-based always-on; agentd's service_name wins; a node id is the instance.
    d = config(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SERVICE_NAME": "from-env"},
        service_name="mine",
        node_id="node-7",
    )
    assert (d.sampler, d.ratio) == ("parentbased_always_on", 1.0)
    assert d.resource["service.name"] == "mine"
    assert d.resource["service.instance.id"] == "node-7"
    # Each of --processes N is an instance of its own: its identity after the address
    # (p0, p1, ... repeat on every machine).
    for name in ("p0", "p1"):
        e = config(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
            host="10.0.0.5",
            port=9000,
            processes=2,
            node_id=name,
        )
        assert e.resource["service.instance.id"] == f"10.0.0.5:9000/{name}"


def test_sdk_disabled_wins() -> None:
    env = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    assert not config(env, otlp_endpoint="http://c:4318").enabled


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:99999"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ("OTEL_TRACES_SAMPLER_ARG", "nan"),
        ("OTEL_RESOURCE_ATTRIBUTES", "a=1,b"),
        ("OTEL_SDK_DISABLED", "maybe"),
    ],
)
def test_bad_values_are_one_settings_error(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert name in caught.value.message and "\n" not in caught.value.message


def test_off_imports_no_sdk() -> None:
    code = (
        "import sys; from agentd.observability.tracing import Tracing; from opentelemetry import"
        " trace; t = Tracing(); assert isinstance(t.tracer, trace.NoOpTracer), t.tracer;"
        " assert not t.enabled; print(sorted(m for m in sys.modules if 'opentelemetry.sdk' in m"
        " or 'exporter' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_json_log_lines_carry_the_trace() -> None:
    tracer = TracerProvider().get_tracer("test")  # sampled spans, exported nowhere
    formatter = JsonFormatter()
    logger = logging.getLogger("agentd.test")
    with tracer.start_as_current_span("request") as span:
        inside = logger.makeRecord("agentd.test", logging.INFO, __file__, 1, "hi %s", ("x",), None)
        line = json.loads(formatter.format(inside))
        try:
            raise ValueError("boom")
        except ValueError:
            failed = json.loads(
                formatter.format(
                    logger.makeRecord(
                        "agentd.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
                    )
                )
            )
    outside = json.loads(formatter.format(inside))
    context = span.get_span_context()
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")
    assert (line["level"], line["logger"], line["message"]) == ("info", "agentd.test", "hi x")
    assert line["time"].endswith("Z")
    assert "ValueError: boom" in failed["exception"] and failed["trace_id"] == line["trace_id"]
    assert "trace_id" not in outside
