"""Every HTTP route the gateway serves, as path templates: one list to enumerate.

RPC methods (gRPC, gRPC-Web, Connect: POST to ``/package.Service/Method``) are not listed
here; the server lists them itself through gRPC reflection. A unit test checks this table
against the routers, so a route added there without a line here fails it.

Plain Python on purpose: it imports no generated protobufs, so a test process that loads
other copies of the same protos (tritonclient) can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HTTP_ROUTES", "HttpRoute"]

_READ = ("GET", "HEAD")
_WRITE = ("POST",)


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """``template`` has ``{model}`` (a model name) and ``{version}`` placeholders."""

    template: str
    methods: tuple[str, ...]
    open: bool = False  # answered without a bearer token when tokens are configured

    def path(self, model: str, version: str = "1") -> str:
        return self.template.format(model=model, version=version)


HTTP_ROUTES: tuple[HttpRoute, ...] = (
    # operations (agentd.gateway.ops, tools_api, plugins_api)
    HttpRoute("/", _READ),
    HttpRoute("/healthz", _READ, open=True),
    HttpRoute("/readyz", _READ, open=True),
    HttpRoute("/metrics", _READ),
    HttpRoute("/v1/tools", _READ),
    HttpRoute("/v1/plugins", _READ),
    # OpenAI-compatible (agentd.gateway.openai)
    HttpRoute("/v1/models", _READ),
    HttpRoute("/v1/models/{model}", _READ),
    HttpRoute("/v1/completions", _WRITE),
    HttpRoute("/v1/chat/completions", _WRITE),
    # KServe v2 REST (agentd.gateway.kserve.rest)
    HttpRoute("/v2", _READ),
    HttpRoute("/v2/health/live", _READ, open=True),
    HttpRoute("/v2/health/ready", _READ, open=True),
    HttpRoute("/v2/models/{model}", _READ),
    HttpRoute("/v2/models/{model}/ready", _READ),
    HttpRoute("/v2/models/{model}/infer", _WRITE),
    HttpRoute("/v2/models/{model}/versions/{version}", _READ),
    HttpRoute("/v2/models/{model}/versions/{version}/ready", _READ),
    HttpRoute("/v2/models/{model}/versions/{version}/infer", _WRITE),
    # KServe model repository extension (agentd.gateway.model_admin)
    HttpRoute("/v2/repository/index", _WRITE),
    HttpRoute("/v2/repository/models/{model}/load", _WRITE),
    HttpRoute("/v2/repository/models/{model}/unload", _WRITE),
)
