from agentd import Agent
from agentd.tools import ToolError


class ToolUser(Agent):
    """Calls the calc tool on its message text; reports tool errors as text."""

    name = "tool-user"

    async def handle(self, ctx, message):
        tool, _, text = message.text.partition(" ")
        try:
            if tool == "calc":
                result = await ctx.tool("calc", {"expression": text})
            else:
                result = await ctx.tool(tool, {})
        except ToolError as exc:
            return f"{type(exc).__name__}: {exc.message}"
        return f"{tool} = {result}"
