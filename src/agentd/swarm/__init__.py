"""The swarm: N agents each decide an action with the built-in model and report it."""

from agentd.swarm.run import SwarmResult, run_swarm

__all__ = ["SwarmResult", "run_swarm"]
