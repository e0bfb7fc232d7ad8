"""ASGI handlers for the OpenAI-compatible routes, over the generation service.

The gateway has already checked the bearer token; this module reads the body within its
limit, validates it (requests.py), runs the completion and answers in OpenAI's shapes:
JSON, or server-sent events ending with ``data: [DONE]`` when ``stream`` is true. Errors use
OpenAI's ``{"error": {"message", "type", "param", "code"}}``: as the body of a 4xx/5xx, or,
once a stream's 200 is out, as its last event before ``data: [DONE]``. A client that goes
away stops its generation, which returns the sequence's KV-cache blocks to the pool.

The OpenAI API carries no deadline of the caller's: every completion gets the node's
default deadline from the generation service (a 504 before the answer, or an error event
``deadline_exceeded`` ending a stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from agentd.errors import AgentdError, Code, Internal, InvalidArgument
from agentd.gateway.admission import (
    BodyTooLarge,
    InflatedTooLarge,
    UnsupportedEncoding,
    buffer_body,
    inflate,
)
from agentd.gateway.asgi import Receive, Scope, Send
from agentd.gateway.detach import ClientGone
from agentd.gateway.openai.embeddings import EMBEDDINGS_PATH, EmbeddingRoutes
from agentd.gateway.openai.requests import RequestError, parse_chat, parse_completion
from agentd.gateway.protocol import clip, connect_code, header, http_status, send_json
from agentd.gateway.redact import public_message
from agentd.generate.service import PromptTooLong
from agentd.generate.types import MAX_SEED, SamplingParams, ScoredToken

if TYPE_CHECKING:
    from agentd.generate.service import GenerationService, LanguageModel
    from agentd.generate.text_stream import TextStream
    from agentd.generate.tokenizer import Tokenizer
    from agentd.inference.embedding import Embeddings

__all__ = ["OpenAIRoutes"]

log = logging.getLogger(__name__)

OnGone = Callable[[], bool] | None

_MODELS = "/v1/models"
_COMPLETIONS = "/v1/completions"
_CHAT = "/v1/chat/completions"
_ERROR_TYPES = {
    Code.NOT_FOUND: "not_found_error",
    Code.RESOURCE_EXHAUSTED: "rate_limit_error",
    Code.UNAUTHENTICATED: "authentication_error",
}
_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]


class OpenAIRoutes:
    def __init__(
        self,
        service: GenerationService,
        *,
        max_body_bytes: int,
        embeddings: Embeddings | None = None,
    ) -> None:
        self._service = service
        self._embeddings = EmbeddingRoutes(embeddings)  # /v1/embeddings (embeddings.py)
        self._limit = max_body_bytes
        self._created = int(time.time())

    def label(self, path: str) -> str | None:
        """The metrics label for ``path``, or None when the path is not one of ours."""
        if path in (_MODELS, _COMPLETIONS, _CHAT, EMBEDDINGS_PATH):
            return path
        if path.startswith(_MODELS + "/"):
            return _MODELS + "/{model}"
        return None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        try:
            if path.startswith(_MODELS):
                if method not in ("GET", "HEAD"):
                    raise _MethodNotAllowed("GET, HEAD")
                await self._models(path, send)
                return
            if method != "POST":
                raise _MethodNotAllowed("POST")
            try:
                body, gone = await buffer_body(receive, self._limit)
            except BodyTooLarge:
                await _send_error(
                    send,
                    413,
                    f"request body is larger than {self._limit} bytes",
                    "invalid_request_error",
                )
                return
            if gone:
                return
            try:
                body = inflate(body, header(scope, b"content-encoding"), self._limit)
            except UnsupportedEncoding as exc:
                await _send_error(
                    send,
                    415,
                    exc.message,
                    "invalid_request_error",
                    headers=[(b"accept-encoding", b"gzip, deflate")],
                )
                return
            except InflatedTooLarge as exc:
                await _send_error(send, 413, exc.message, "invalid_request_error")
                return
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise RequestError(f"the body is not valid JSON: {exc}", None) from None
            if path == _COMPLETIONS:
                await self._completion(data, receive, send)
            elif path == EMBEDDINGS_PATH:
                await send_json(send, 200, await self._embeddings.embed(data))
            else:
                await self._chat(data, receive, send)
        except ClientGone:
            log.debug("client left before its completion finished")
        except _MethodNotAllowed as exc:
            await _send_error(
                send,
                405,
                f"use {exc.allowed} for {clip(path)}",
                "invalid_request_error",
                headers=[(b"allow", exc.allowed.encode())],
            )
        except RequestError as exc:
            await _send_error(send, 400, exc.message, "invalid_request_error", param=exc.param)
        except AgentdError as exc:
            status, error = _error_body(exc)
            await send_json(send, status, error)

    async def _models(self, path: str, send: Send) -> None:
        if path == _MODELS:
            cards = [self._card(m) for m in self._service.models()]
            cards += self._embeddings.cards(self._created)  # kind: embedding models
            data = {"object": "list", "data": cards}
        else:
            name = path[len(_MODELS) + 1 :]
            data = self._embeddings.card(name, self._created) or self._card(self._service.get(name))
        await send_json(send, 200, data)

    def _card(self, model: LanguageModel) -> dict[str, Any]:
        return {
            "id": model.name,
            "object": "model",
            "created": self._created,
            "owned_by": "agentd",
            "context_length": model.config.context_length,
            "platform": model.config.platform,
        }

    # -- completions ---------------------------------------------------------------------

    async def _start(
        self,
        model: LanguageModel,
        prompt: str | list[dict[str, str]],
        params: SamplingParams,
        n: int,
        field: str,
    ) -> list[TextStream]:
        """``n`` completions of one prompt (choice i > 0 of a seeded request draws with
        seed + i, so the choices are independent yet reproducible)."""
        try:
            params.check_vocab(model.generator.info.vocab_size)
        except InvalidArgument as exc:
            raise RequestError(exc.message, "logit_bias") from None
        streams: list[TextStream] = []
        try:
            for index in range(n):
                choice = params
                if index and params.seed is not None:
                    choice = dataclasses.replace(
                        params, seed=(params.seed + index) % (MAX_SEED + 1)
                    )
                # The OpenAI API carries no deadline of the caller's: the default applies.
                streams.append(self._service.complete(model, prompt, choice))
        except PromptTooLong as exc:
            await _close_all(streams)
            raise RequestError(
                f"'{field}' is {exc.size}; the model's context is {exc.context} tokens", field
            ) from None
        except BaseException:
            await _close_all(streams)
            raise
        return streams

    async def _completion(self, data: Any, receive: Receive, send: Send) -> None:
        request = parse_completion(data)
        model = self._service.get(request.model)
        streams = await self._start(model, request.prompt, request.params, request.n, "prompt")
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo = request.prompt if request.echo else ""
        tokenizer = model.tokenizer
        # Where the next token's text starts, per choice (the legacy text_offset).
        offsets = [len(echo)] * len(streams)

        def logprobs(index: int, scored: list[ScoredToken]) -> dict[str, Any] | None:
            if streams[index].scored is None:
                return None
            shape, offsets[index] = _legacy_logprobs(tokenizer, scored, offsets[index])
            return shape

        def chunk(index: int, text: str, finish: str | None, lp: Any = None) -> dict[str, Any]:
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
            return {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model.name,
                "choices": [choice],
            }

        if not request.stream:
            texts = await _until_gone(_texts(streams), receive)
            choices = [
                {
                    "index": index,
                    "text": echo + text,
                    "logprobs": logprobs(index, stream.scored or []),
                    "finish_reason": stream.finish_reason,
                }
                for index, (stream, text) in enumerate(zip(streams, texts, strict=True))
            ]
            body = {**chunk(0, "", None), "choices": choices, "usage": _usage(streams)}
            await send_json(send, 200, body)
            return

        async def events() -> AsyncGenerator[dict[str, Any], None]:
            if echo:
                for index in range(len(streams)):
                    yield chunk(index, echo, None)
            async for index, piece in _merged(streams):
                stream = streams[index]
                lp = logprobs(index, stream.take_scored())
                if piece is None:
                    yield chunk(index, "", stream.finish_reason, lp)
                else:
                    yield chunk(index, piece, None, lp)

        await _send_events(
            send,
            receive,
            events(),
            lambda: (
                {**chunk(0, "", None), "choices": [], "usage": _usage(streams)}
                if request.include_usage
                else None
            ),
            lambda: sum(s.completion_tokens for s in streams),
        )

    async def _chat(self, data: Any, receive: Receive, send: Send) -> None:
        request = parse_chat(data)
        model = self._service.get(request.model)
        streams = await self._start(model, request.messages, request.params, request.n, "messages")
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        tokenizer = model.tokenizer

        def logprobs(index: int, scored: list[ScoredToken]) -> dict[str, Any] | None:
            if streams[index].scored is None:
                return None
            return {"content": [_chat_entry(tokenizer, t) for t in scored], "refusal": None}

        def frame(choices: list[dict[str, Any]], kind: str) -> dict[str, Any]:
            return {
                "id": ident,
                "object": kind,
                "created": created,
                "model": model.name,
                "choices": choices,
            }

        if not request.stream:
            texts = await _until_gone(_texts(streams), receive)
            choices = [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs(index, stream.scored or []),
                    "finish_reason": stream.finish_reason,
                }
                for index, (stream, text) in enumerate(zip(streams, texts, strict=True))
            ]
            body = frame(choices, "chat.completion")
            body["usage"] = _usage(streams)
            await send_json(send, 200, body)
            return
        kind = "chat.completion.chunk"
        started = [False] * len(streams)

        async def events() -> AsyncGenerator[dict[str, Any], None]:
            async for index, piece in _merged(streams):
                stream = streams[index]
                lp = logprobs(index, stream.take_scored())
                if piece is None:
                    choice = {
                        "index": index,
                        "delta": {},
                        "logprobs": lp,
                        "finish_reason": stream.finish_reason,
                    }
                else:
                    content: dict[str, Any] = {"content": piece}
                    if not started[index]:
                        content = {"role": "assistant", "content": piece}
                        started[index] = True
                    choice = {
                        "index": index,
                        "delta": content,
                        "logprobs": lp,
                        "finish_reason": None,
                    }
                yield frame([choice], kind)

        await _send_events(
            send,
            receive,
            events(),
            lambda: (
                {**frame([], kind), "usage": _usage(streams)} if request.include_usage else None
            ),
            lambda: sum(s.completion_tokens for s in streams),
        )


class _MethodNotAllowed(Exception):
    def __init__(self, allowed: str) -> None:
        self.allowed = allowed


def _usage(streams: list[TextStream]) -> dict[str, int]:
    """The prompt once, the completion tokens of every choice (as OpenAI counts n > 1)."""
    prompt = streams[0].prompt_tokens
    completion = sum(stream.completion_tokens for stream in streams)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([int(token)], skip_special=False)


def _chat_entry(tokenizer: Tokenizer, token: ScoredToken) -> dict[str, Any]:
    """One token in the chat API's logprobs shape."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        **one(token, token.logprob),
        "top_logprobs": [one(alt, logprob) for alt, logprob in token.top],
    }


def _legacy_logprobs(
    tokenizer: Tokenizer, scored: list[ScoredToken], offset: int
) -> tuple[dict[str, Any], int]:
    """The completions API's logprobs object for ``scored`` (text offsets from
    ``offset``), and the offset after them."""
    tokens, offsets = [], []
    for token in scored:
        text = _token_text(tokenizer, token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    shape = {
        "tokens": tokens,
        "token_logprobs": [token.logprob for token in scored],
        "top_logprobs": [
            {_token_text(tokenizer, alt): logprob for alt, logprob in token.top} for token in scored
        ],
        "text_offset": offsets,
    }
    return shape, offset


async def _close_all(streams: list[TextStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def _texts(streams: list[TextStream]) -> list[str]:
    """Every choice's whole text, generated at once; a failure (or cancellation) of one
    stops the others."""
    if len(streams) == 1:
        return [await streams[0].text()]
    tasks = [asyncio.ensure_future(stream.text()) for stream in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _merged(
    streams: list[TextStream],
) -> AsyncGenerator[tuple[int, str | None], None]:
    """``(choice index, text piece)`` as each choice produces it; ``(index, None)`` when
    that choice has ended (its finish_reason set). Closing this stops every choice."""
    if len(streams) == 1:
        async with contextlib.aclosing(aiter(streams[0])) as pieces:
            async for piece in pieces:
                yield 0, piece
        yield 0, None
        return
    queue: asyncio.Queue[tuple[int, str | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: TextStream) -> None:
        try:
            async with contextlib.aclosing(aiter(stream)) as pieces:
                async for piece in pieces:
                    queue.put_nowait((index, piece))
        except Exception as exc:
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                left -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _settle(task: asyncio.Future[Any]) -> None:
    # Read the outcome of a task we gave up on, so the loop never logs it as unretrieved.
    if not task.cancelled():
        task.exception()


async def _until_gone(work: Awaitable[Any], receive: Receive, *, on_gone: OnGone = None) -> Any:
    """Run ``work``; if the client disconnects first, cancel it (freeing what it holds:
    the sequence's KV blocks) and raise ClientGone once it has wound down.

    ``on_gone`` is told when the client leaves and answers whether the work may be
    cancelled now; a producer inside a send answers no (cancelling the server's send
    future makes the server log an error) and stops by itself when that send returns.
    The work has always finished when this returns, and its outcome is read here, never
    left to the loop's "never retrieved" log.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    task.add_done_callback(_settle)
    watcher.add_done_callback(_settle)
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and (on_gone is None or on_gone()):
            task.cancel()
        await asyncio.wait({task})
    finally:
        watcher.cancel()
        if not task.done():  # we were cancelled ourselves: stop the work too
            task.cancel()
    if task.cancelled() or isinstance(task.exception(), ClientGone):
        raise ClientGone("the client disconnected")
    return task.result()


async def _send_events(
    send: Send,
    receive: Receive,
    events: AsyncGenerator[dict[str, Any], None],
    usage_event: Callable[[], dict[str, Any] | None],
    generated: Callable[[], int],
) -> None:
    sending = gone = False

    async def send_now(message: dict[str, Any]) -> None:
        nonlocal sending
        sending = True
        try:
            await send(message)
        finally:
            sending = False
        if gone:
            raise ClientGone("the client disconnected")

    def on_gone() -> bool:
        nonlocal gone
        gone = True
        return not sending

    async def produce() -> None:
        await send_now({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        try:
            # Closed explicitly: a send that fails must stop generation now, not at collection.
            async with contextlib.aclosing(events) as frames:
                async for frame in frames:
                    await send_now(
                        {"type": "http.response.body", "body": _event(frame), "more_body": True}
                    )
        except ClientGone:
            raise
        except Exception as exc:
            # The 200 is out: a failure can only be told as an event now (OpenAI's error
            # shape, which the openai package raises as APIError); then the stream ends as
            # every stream does, for clients that read until [DONE].
            if isinstance(exc, AgentdError):
                failure: AgentdError = exc
                log.info("a stream failed after %d tokens: %s", generated(), exc)
            else:  # a bug: the details go to the log, not to the client
                failure = Internal("internal error")
                log.exception("a stream failed after %d tokens", generated())
            error = _event(_error_body(failure)[1])
            await send_now({"type": "http.response.body", "body": error + _DONE})
            return
        usage = usage_event()
        tail = _event(usage) if usage is not None else b""
        await send_now({"type": "http.response.body", "body": tail + _DONE})

    try:
        await _until_gone(produce(), receive, on_gone=on_gone)
    except ClientGone:
        log.debug("client left a stream after %d tokens", generated())


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _error_body(exc: AgentdError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI's error object for ``exc``: ``type`` from the status (as
    OpenAI names its errors), ``code`` the agentd code (``model_not_found`` for an unknown
    model, as OpenAI says it)."""
    status = http_status(exc.code)
    kind = _ERROR_TYPES.get(exc.code) or (
        "invalid_request_error" if status < 500 else "server_error"
    )
    code = "model_not_found" if exc.code is Code.NOT_FOUND else connect_code(exc.code)
    error = {"message": public_message(exc.message), "type": kind, "param": None, "code": code}
    return status, {"error": error}


async def _send_error(
    send: Send,
    status: int,
    message: str,
    kind: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send_json(
        send,
        status,
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        headers,
    )
