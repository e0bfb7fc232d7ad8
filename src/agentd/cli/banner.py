"""What ``agentd serve`` prints once it listens: where, the plugin folder, what the node
loaded, and one example call per protocol."""

from __future__ import annotations

from pathlib import Path

from agentd.server import Listening

__all__ = ["banner"]


def plugin_folder_line(plugins: Path) -> str:
    """The plugin folder in use as an absolute path (the default ``./plugins`` depends on
    where serve starts), and whether it exists."""
    folder = plugins.resolve()
    if folder.is_dir():
        return f"plugin folder: {folder}"
    return f"plugin folder: {folder} (does not exist: built-in agents, models and tools only)"


def banner(
    listening: Listening,
    auth: bool,
    plugins: Path | None = None,
    processes: int = 1,
    loaded: str | None = None,
) -> str:
    """``loaded``: the node's summary of what it loaded (agents, tools, models), one line."""
    host = listening.host if listening.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if listening.tls else "http"
    url = f"{scheme}://{host}:{listening.port}"
    protocols = "HTTP/1.1, HTTP/2 (TLS, ALPN)" if listening.tls else "HTTP/1.1, HTTP/2 (h2c)"
    if listening.http3:
        protocols += ", HTTP/3 (QUIC)"
    curl_k = "-k " if listening.tls else ""
    auth_h = " -H 'authorization: Bearer $TOKEN'" if auth else ""
    grpc_flag = "-insecure" if listening.tls else "-plaintext"
    grpc_auth = " -H 'authorization: Bearer $TOKEN'" if auth else ""
    body = '{"agent":"echo","message":{"text":"hello"}}'
    chat = '{"model":"tinylm","messages":[{"role":"user","content":"hello"}],"stream":true}'
    if processes > 1:
        protocols += f"; {processes} processes"
    lines = [f"agentd listening on {url} ({protocols})"]
    if plugins is not None:
        lines.append(plugin_folder_line(plugins))
    if loaded is not None:
        lines.append(loaded)
    lines += [
        "",
        "try:",
        f"  curl {curl_k}{url}/agentd.v1.AgentService/Invoke -H 'content-type: application/json'"
        f"{auth_h} -d '{body}'",
        f"  grpcurl {grpc_flag}{grpc_auth} -d '{body}' {host}:{listening.port} "
        "agentd.v1.AgentService/Invoke",
        f"  agentd call echo 'hello streaming world' --stream --url {url}",
        f"  curl {curl_k}-N {url}/v1/chat/completions -H 'content-type: application/json'"
        f"{auth_h} -d '{chat}'",
        f'  agentd tools call calc \'{{"expression": "6 * 7"}}\' --url {url}',
        f"  curl {curl_k}{url}/metrics",
        "",
        "Ctrl-C drains in-flight calls and stops.",
    ]
    return "\n".join(lines)
