"""The node's spans below the gateway: agent turns, inference calls and batches, model runs,
generations, tool calls and state commits (docs/observability.md, "Traces").

Only this package imports OpenTelemetry. The runtime and the services hold a :class:`Spans`
(given by the node when tracing is on) or None: with tracing off their cost is one check
of that attribute per turn or call. The objects handed back (spans, turn scopes, contexts)
are used through their methods only, so the layers below need no OpenTelemetry import.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from agentd.observability.tracing import UnsampledSpan, current_span

__all__ = ["CallSpan", "Spans", "TurnScope"]

_ROOT = Context()  # no parent: a span started in it begins a trace (links aside)
_perf_counter = time.perf_counter
_OUTCOME_CODES = {"deadline": "DEADLINE_EXCEEDED", "cancelled": "CANCELLED"}


class TurnScope:
    """An agent turn's span, current in the worker running the turn until :meth:`close`
    (so that the turn's calls, and the messages it sends, are its children)."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, token: object) -> None:
        self.span = span
        self.token = token

    def close(self, outcome: str, code: str | None = None) -> None:
        """End the turn with ``outcome`` (ok, error, deadline, cancelled) and, for an
        error, its agentd error code (INTERNAL for an exception of the agent's own)."""
        span = self.span
        span.set_attribute("agentd.turn.outcome", outcome)
        if outcome != "ok":
            code = code or _OUTCOME_CODES.get(outcome, "INTERNAL")
            span.set_attribute("agentd.error.code", code)
            span.set_status(Status(StatusCode.ERROR, code))
        span.end()
        otel_context.detach(self.token)  # type: ignore[arg-type]


class _DroppedTurn:
    """A turn under a span the sampler dropped: no span, only its parent's context made
    current (what the turn causes follows the decision) until :meth:`close`."""

    __slots__ = ("token",)

    def __init__(self, token: object) -> None:
        self.token = token

    def close(self, outcome: str, code: str | None = None) -> None:
        otel_context.detach(self.token)  # type: ignore[arg-type]


def _dropped(context: Context | None = None) -> Span | None:
    """The span in ``context`` (default: the current one) when a span under it would not be
    sampled: a local span that was not (see ``Tracing.unsampled``: every sampler agentd
    configures decides the same for its children). Handed back in place of a child: its
    methods record nothing."""
    found = current_span(context)
    if type(found) is UnsampledSpan:  # a request the gateway dropped: the common case
        return found
    span = trace.get_current_span(context)
    span_context = span.get_span_context()
    if span_context.trace_flags.sampled or span_context.is_remote or not span_context.is_valid:
        return None
    return span


class CallSpan:
    """A span that ends when a call's future is done (``ctx.infer``): its ``context`` is
    what the batch that serves the call links to."""

    __slots__ = ("context", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.context = span.get_span_context()

    def done(self, future: Any) -> None:
        """The future's done-callback: the outcome, then the end."""
        span = self.span
        if future.cancelled():
            span.set_status(Status(StatusCode.ERROR, "cancelled"))
        elif (error := future.exception()) is not None:
            _failed(span, error)
        span.end()

    def failed(self, error: BaseException) -> None:
        """The call was refused before it queued."""
        _failed(self.span, error)
        self.span.end()


class Spans:
    """Starts the node's spans on ``tracer`` (an OpenTelemetry tracer)."""

    __slots__ = ("tracer",)

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    # -- agent turns and messages ---------------------------------------------------------

    @staticmethod
    def current() -> object:
        """The current trace context, to carry in a message to another agent (its turn
        becomes a child of the sender's span)."""
        return otel_context.get_current()

    def turn(self, address: Any, parent: object, kind: str) -> TurnScope | _DroppedTurn:
        """Start ``agent.turn`` for the agent at ``address`` under ``parent`` (a context
        from :meth:`current`; None: the turn begins a trace) and make it current.
        ``kind``: ask, stream or tell. Under a span the sampler dropped: no span (and no
        attributes), the parent made current."""
        parent_context: Context = parent if parent is not None else _ROOT  # type: ignore[assignment]
        if parent is not None and _dropped(parent_context) is not None:
            return _DroppedTurn(otel_context.attach(parent_context))
        span = self.tracer.start_span(
            "agent.turn",
            context=parent_context,
            kind=SpanKind.CONSUMER if kind == "tell" else SpanKind.SERVER,
            attributes={
                "agentd.agent.type": address.type,
                "agentd.agent.address": address.type + "/" + address.id,
                "agentd.turn.kind": kind,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent_context))
        return TurnScope(span, token)

    # -- inference --------------------------------------------------------------------------

    def infer(self, model: str, rows: int) -> CallSpan:
        """``inference.call``: one caller's rows, from queueing to its answer; a child of
        the current span (the turn, or a KServe request)."""
        dropped = _dropped()
        if dropped is not None:
            return CallSpan(dropped)
        return CallSpan(
            self.tracer.start_span(
                "inference.call",
                kind=SpanKind.CLIENT,
                attributes={"agentd.model": model, "agentd.inference.rows": rows},
            )
        )

    def batch(self, model: str, callers: Iterable[object], rows: int, queue_seconds: float) -> Span:
        """``inference.batch``: one run of a model for many callers, each of them maybe in a
        trace of its own, so the batch begins its own trace and links to each caller's
        ``inference.call`` span (OpenTelemetry's way for batch processing: links, not a
        parent picked among the callers)."""
        links = [Link(context) for context in callers]  # type: ignore[arg-type]
        return self.tracer.start_span(
            "inference.batch",
            context=_ROOT,
            links=links,
            attributes={
                "agentd.model": model,
                "agentd.batch.size": len(links),
                "agentd.batch.rows": rows,
                "agentd.batch.queue_seconds": queue_seconds,
            },
        )

    def model_run(self, model: str, batch: Span) -> Span:
        """``inference.run``: the model's execution on its thread, inside ``batch``."""
        return self.tracer.start_span(
            "inference.run",
            context=trace.set_span_in_context(batch, _ROOT),
            attributes={"agentd.model": model},
        )

    # -- generation, tools, state -----------------------------------------------------------

    def generate(self, model: str, prompt_tokens: int, max_tokens: int) -> Span:
        """``generate``: one completion (``ctx.generate``, an OpenAI request), a child of
        the current span; :meth:`generated` ends it."""
        dropped = _dropped()
        if dropped is not None:
            return dropped
        return self.tracer.start_span(
            "generate",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "text_completion",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": max_tokens,
                "gen_ai.usage.input_tokens": prompt_tokens,
            },
        )

    @staticmethod
    def generated(
        span: Span,
        *,
        first_token_s: float | None,
        completion_tokens: int,
        finish_reason: str | None,
        error: BaseException | None = None,
    ) -> None:
        """End a ``generate`` span with what the completion did."""
        if first_token_s is not None:
            span.set_attribute("agentd.generate.time_to_first_token_seconds", first_token_s)
        span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
        if finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", (finish_reason,))
        if error is not None:
            _failed(span, error)
        span.end()

    def tool(self, name: str) -> Span:
        """``tool.call``: one sandboxed tool call, a child of the current span;
        :meth:`tool_done` ends it."""
        dropped = _dropped()
        if dropped is not None:
            return dropped
        return self.tracer.start_span(
            "tool.call", kind=SpanKind.CLIENT, attributes={"agentd.tool.name": name}
        )

    @staticmethod
    def tool_ran(span: Span, sandbox_s: float, fuel: int) -> None:
        """What the sandbox did for a ``tool.call`` (from the tool's thread): the time in
        it and the fuel used."""
        if not span.is_recording():
            return  # ended already: the caller was answered at its deadline
        span.set_attribute("agentd.tool.sandbox_seconds", sandbox_s)
        span.set_attribute("agentd.tool.fuel_used", fuel)

    @staticmethod
    def tool_done(span: Span, outcome: str) -> None:
        """End a ``tool.call`` span: ``outcome`` ok or the ToolError kind."""
        span.set_attribute("agentd.tool.outcome", outcome)
        if outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()

    def commit(self, size: int) -> Span:
        """``state.commit``: a turn's state on its way to the store, until durable (a
        child of the turn); :meth:`committed` ends it."""
        dropped = _dropped()
        if dropped is not None:
            return dropped
        return self.tracer.start_span("state.commit", attributes={"agentd.state.bytes": size})

    @staticmethod
    def committed(span: Span, future: Any, batch_size: int | None) -> None:
        """End a ``state.commit`` span when its commit's ``future`` is done;
        ``batch_size``: the states committed together (when the store says)."""
        if batch_size is not None:
            span.set_attribute("agentd.state.batch_size", batch_size)
        if future.cancelled():
            span.set_status(Status(StatusCode.ERROR, "cancelled"))
        elif (error := future.exception()) is not None:
            _failed(span, error)
        span.end()


def _failed(span: Span, error: BaseException) -> None:
    code = getattr(error, "code", None)
    name = getattr(code, "name", None) or type(error).__name__
    span.set_attribute("agentd.error.code", name)
    span.set_status(Status(StatusCode.ERROR, f"{name}: {error}"[:200]))
