"""Runtime: runs agent turns."""

from agentd.runtime.facade import AgentTypeInfo, Runtime, TurnObserver

__all__ = ["AgentTypeInfo", "Runtime", "TurnObserver"]
