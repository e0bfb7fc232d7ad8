"""TLS with ALPN (h2 and http/1.1) on the one port, with a CA made for the test."""

from __future__ import annotations

import json
import ssl

import grpc
import httpx
import pytest

from agentd.testing import start_server
from agentd.testing.certs import make_test_certs
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc
from tests.conftest import PLUGINS


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_test_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(certs):
    running = start_server(
        [
            "--tls-cert",
            str(certs.server_cert),
            "--tls-key",
            str(certs.server_key),
            "--http3",
            "--plugins",
            str(PLUGINS),
        ]
    )
    yield running
    running.stop()


def test_banner_says_https_and_http3(tls_server):
    assert tls_server.scheme == "https"
    assert "HTTP/3" in tls_server.log()


def test_grpc_over_tls(tls_server, certs):
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes())
    with grpc.secure_channel(tls_server.target, credentials) as channel:
        reply = pb_grpc.AgentServiceStub(channel).Invoke(
            pb.InvokeRequest(agent="echo", message=pb.Message(text="secure"))
        )
    assert reply.message.text == "secure"


@pytest.mark.parametrize(("http2", "version"), [(False, "HTTP/1.1"), (True, "HTTP/2")])
def test_alpn_negotiates_protocol(tls_server, certs, http2, version):
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    with httpx.Client(verify=context, http1=not http2, http2=http2) as client:
        r = client.post(
            tls_server.url + "/agentd.v1.AgentService/Invoke",
            json={"agent": "echo", "message": {"text": "alpn"}},
        )
    assert r.status_code == 200
    assert r.http_version == version
    assert r.json()["message"]["text"] == "alpn"


def test_untrusted_client_fails_handshake(tls_server):
    with pytest.raises(httpx.ConnectError):
        httpx.get(tls_server.url + "/healthz")


def test_plaintext_to_tls_port_is_refused(tls_server):
    with grpc.insecure_channel(tls_server.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.AgentServiceStub(channel).Invoke(pb.InvokeRequest(agent="echo"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_http3_rejected_without_tls():
    from agentd.testing.server import start_server as start

    with pytest.raises(RuntimeError, match="http3 needs TLS"):
        start(["--http3"])


def test_http3_over_quic(tls_server, certs):
    import asyncio

    from tests.integration.h3client import h3_request

    status, _headers, body = asyncio.run(
        h3_request(
            tls_server.host,
            tls_server.port,
            certs.ca_cert,
            "POST",
            "/agentd.v1.AgentService/Invoke",
            [(b"content-type", b"application/json")],
            b'{"agent":"echo","message":{"text":"quic"}}',
        )
    )
    assert status == 200
    assert b'"quic"' in body


@pytest.fixture(scope="module")
def mtls_server(certs):
    running = start_server(
        [
            "--tls-cert",
            str(certs.server_cert),
            "--tls-key",
            str(certs.server_key),
            "--tls-client-ca",
            str(certs.ca_cert),
        ]
    )
    yield running
    running.stop()


def test_mtls_requires_client_certificate(mtls_server, certs):
    root = certs.ca_cert.read_bytes()
    anonymous = grpc.ssl_channel_credentials(root_certificates=root)
    with (
        grpc.secure_channel(mtls_server.target, anonymous) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        pb_grpc.AgentServiceStub(channel).Invoke(pb.InvokeRequest(agent="echo"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    identified = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=certs.client_key.read_bytes(),
        certificate_chain=certs.client_cert.read_bytes(),
    )
    with grpc.secure_channel(mtls_server.target, identified) as channel:
        reply = pb_grpc.AgentServiceStub(channel).Invoke(
            pb.InvokeRequest(agent="echo", message=pb.Message(text="mutual"))
        )
    assert reply.message.text == "mutual"


def test_http3_and_tcp_share_one_runtime(tls_server, certs):
    """HTTP/3 requests run on pyvoy's second event loop; agent state must still be shared."""
    import asyncio

    from tests.integration.h3client import h3_request

    body = b'{"agent":"counter/shared","message":{}}'
    seen = []
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    with httpx.Client(verify=context, http2=True) as client:
        for _ in range(3):
            r = client.post(
                tls_server.url + "/agentd.v1.AgentService/Invoke",
                content=body,
                headers={"content-type": "application/json"},
            )
            seen.append(int(r.json()["message"]["text"]))
    for _ in range(3):
        status, _headers, reply = asyncio.run(
            h3_request(
                tls_server.host,
                tls_server.port,
                certs.ca_cert,
                "POST",
                "/agentd.v1.AgentService/Invoke",
                [(b"content-type", b"application/json")],
                body,
            )
        )
        assert status == 200
        seen.append(int(json.loads(reply)["message"]["text"]))
    assert seen == [1, 2, 3, 4, 5, 6]
