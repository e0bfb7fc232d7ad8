"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (+ SSE)."""

from agentd.gateway.openai.routes import OpenAIRoutes

__all__ = ["OpenAIRoutes"]
