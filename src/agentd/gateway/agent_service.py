"""``agentd.v1.AgentService``: converts protobuf to plain messages and calls the runtime.

A call's deadline is converted from ``grpc-timeout`` / ``connect-timeout-ms`` and passed on
as is (None without one): the runtime applies the node's deadline rule, the tool service
its own limit (``agentd.deadlines``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from connectrpc.request import RequestContext

from agentd.agents.message import Message
from agentd.errors import AgentdError, Unavailable
from agentd.gateway.rpc_errors import call_timeout, to_connect_error
from agentd.runtime import Runtime
from agentd.tools.service import ToolService
from agentd.v1 import agent_pb2 as pb

__all__ = ["AgentServiceImpl", "message_from_pb", "message_to_pb"]


def message_from_pb(msg: pb.Message) -> Message:
    return Message(msg.text, msg.data, dict(msg.metadata))


def message_to_pb(msg: Message) -> pb.Message:
    return pb.Message(text=msg.text, data=msg.data, metadata=msg.metadata)


class AgentServiceImpl:
    """The connect-python service object; one per gateway."""

    def __init__(self, runtime: Runtime, *, tools: ToolService | None = None) -> None:
        self._runtime = runtime
        self._tools = tools

    async def invoke(self, request: pb.InvokeRequest, ctx: RequestContext) -> pb.InvokeResponse:
        timeout = call_timeout(ctx)
        try:
            address, reply = await self._runtime.invoke(
                request.agent, message_from_pb(request.message), timeout=timeout
            )
        except AgentdError as exc:
            raise to_connect_error(exc) from exc
        return pb.InvokeResponse(agent=str(address), message=message_to_pb(reply))

    async def invoke_stream(
        self, request: pb.InvokeRequest, ctx: RequestContext
    ) -> AsyncIterator[pb.AgentEvent]:
        timeout = call_timeout(ctx)
        events = self._runtime.stream(
            request.agent, message_from_pb(request.message), timeout=timeout
        )
        index = 0
        try:
            async for address, event in events:
                if isinstance(event, str):
                    yield pb.AgentEvent(agent=str(address), index=index, token=event)
                else:
                    yield pb.AgentEvent(
                        agent=str(address), index=index, message=message_to_pb(event)
                    )
                index += 1
        except AgentdError as exc:
            raise to_connect_error(exc) from exc
        finally:
            await events.aclose()

    async def list_agents(
        self, request: pb.ListAgentsRequest, ctx: RequestContext
    ) -> pb.ListAgentsResponse:
        return pb.ListAgentsResponse(
            agents=[
                pb.AgentType(
                    name=info.name,
                    description=info.description,
                    streaming=info.streaming,
                    active_instances=info.active_instances,
                )
                for info in self._runtime.list_types()
            ]
        )

    async def list_tools(
        self, request: pb.ListToolsRequest, ctx: RequestContext
    ) -> pb.ListToolsResponse:
        tools = self._tools.list_tools() if self._tools is not None else []
        return pb.ListToolsResponse(
            tools=[
                pb.Tool(
                    name=t.name,
                    description=t.description,
                    parameters_json=orjson.dumps(t.parameters).decode(),
                )
                for t in tools
            ]
        )

    async def call_tool(
        self, request: pb.CallToolRequest, ctx: RequestContext
    ) -> pb.CallToolResponse:
        timeout = call_timeout(ctx)
        try:
            if self._tools is None:
                raise Unavailable("this server has no tool service")
            result = await self._tools.call_json(
                request.name, request.arguments_json, timeout=timeout
            )
        except AgentdError as exc:
            raise to_connect_error(exc) from exc
        return pb.CallToolResponse(result_json=result)
