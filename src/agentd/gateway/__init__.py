"""Gateway: every protocol on one port, converted to runtime calls.

Nothing is imported eagerly: protocol modules register generated protobuf types, and tests
that use other clients' copies of the same protos (tritonclient) must not load ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentd.gateway.app import Gateway

__all__ = ["Gateway"]


def __getattr__(name: str) -> Any:
    if name == "Gateway":
        from agentd.gateway.app import Gateway

        return Gateway
    raise AttributeError(name)
