"""The HTTP side: OpenAI's routes on FastAPI, the API key, the body limit, server-sent events.

Routes: `GET /health` (open), `GET /v1/models[/{id}]`, `POST /v1/completions`, `POST /v1/chat/completions`
(with `stream: true`: `data: {chunk}` events ending with `data: [DONE]`). With an API key every route
but /health needs `Authorization: Bearer KEY` (compared in constant time; the key is never logged). A
body is read only up to `max_body` bytes: a larger Content-Length is refused before reading, a longer
stream as soon as it passes the limit. Every refusal is OpenAI's error object with a 4xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from adapt.serving.api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Plan,
    Served,
    parse,
    plan_chat,
    plan_completion,
)
from adapt.serving.batcher import Batcher, Delta, Done, Failed, Job


def build_app(served: Served, batcher: Batcher, api_key: str | None, max_body: int) -> FastAPI:
    """The server's app over a started `batcher`."""
    app = FastAPI(title="adapt serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _server_error)
    created = int(time.time())

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1")  # the header's bytes, as sent
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, api_key.encode()):
            raise ApiError(
                401, "a valid API key is required: Authorization: Bearer KEY", None, "invalid_api_key"
            )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": created, "owned_by": "adapt"}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @v1.get("/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != served.name:
            raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return card()

    @v1.post("/completions")
    async def completions(request: Request) -> Any:
        req = parse(CompletionRequest, await read_json(request, max_body))
        plan = await asyncio.to_thread(plan_completion, req, served)  # tokenizing: off the event loop
        return await answer(plan, batcher, Shape("text_completion", served.name))

    @v1.post("/chat/completions")
    async def chat(request: Request) -> Any:
        req = parse(ChatRequest, await read_json(request, max_body))
        plan = await asyncio.to_thread(plan_chat, req, served)
        return await answer(plan, batcher, Shape("chat.completion", served.name))

    app.include_router(v1)
    return app


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, read no further than `limit` bytes."""
    too_large = ApiError(
        413, f"the request body is over this server's limit of {limit} bytes", None, "request_too_large"
    )
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise ApiError(400, f"Content-Length {declared[:40]!r} is not a number of bytes")
    if declared is not None and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(bytes(body), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class Shape:
    """The JSON of one route's answers: whole (`object`) and chunked (`object`.chunk)."""

    def __init__(self, kind: str, model: str) -> None:
        self.chat = kind == "chat.completion"
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, finals: list[Done]) -> dict[str, Any]:
        choices = [
            {"index": d.index, "message": {"role": "assistant", "content": d.final.text}}
            if self.chat
            else {"index": d.index, "text": d.final.text}
            for d in finals
        ]
        for choice, d in zip(choices, finals, strict=True):
            choice.update(logprobs=None, finish_reason=d.final.finish_reason)
        return {**self._envelope(self.kind, choices), "usage": usage(finals)}

    def chunk(self, index: int, text: str | None, finish: str | None = None) -> str:
        """One event: new text of a choice (chat: None is the opening role delta), or its end."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if text is None else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse(self._envelope("chat.completion.chunk", [choice]))
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse(self._envelope("text_completion", [choice]))

    def usage_chunk(self, finals: list[Done]) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self._envelope(kind, []), "usage": usage(finals)})


def usage(finals: list[Done]) -> dict[str, int]:
    prompt = sum(d.prompt_tokens for d in finals)
    completion = sum(len(d.final.tokens) for d in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def answer(plan: Plan, batcher: Batcher, shape: Shape) -> Any:
    """Queue the plan's prompts; the whole answer as JSON, or a stream of chunks."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Delta | Done | Failed] = asyncio.Queue()

    def emit(event: Delta | Done | Failed) -> None:  # called from decoding threads
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is shutting down
            loop.call_soon_threadsafe(events.put_nowait, event)

    jobs = [Job(ids, plan.config, i, emit) for i, ids in enumerate(plan.prompts)]
    batcher.submit(jobs)

    def cancel() -> None:  # the answer is sent, or nobody is there to read it
        for job in jobs:
            job.cancelled = True

    if plan.stream:
        return _Stream(_chunks(events, jobs, shape, plan.include_usage), cancel)
    try:
        finals: list[Done] = []
        while len(finals) < len(jobs):
            event = await events.get()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Done):
                finals.append(event)
        return shape.whole(sorted(finals, key=lambda d: d.index))
    finally:
        cancel()


async def _chunks(
    events: asyncio.Queue[Delta | Done | Failed], jobs: list[Job], shape: Shape, include_usage: bool
) -> AsyncIterator[str]:
    if shape.chat:
        for job in jobs:
            yield shape.chunk(job.index, None)
    finals: list[Done] = []
    while len(finals) < len(jobs):
        event = await events.get()
        if isinstance(event, Failed):
            yield sse(event.error.body())
            break
        if event.text:
            yield shape.chunk(event.index, event.text)
        if isinstance(event, Done):
            finals.append(event)
            yield shape.chunk(event.index, "" if shape.chat else None, event.final.finish_reason)
    else:
        if include_usage:
            yield shape.usage_chunk(sorted(finals, key=lambda d: d.index))
    yield "data: [DONE]\n\n"


class _Stream(StreamingResponse):
    """Server-sent events; however the response ends (done, client gone, server stopping), its jobs are
    cancelled, so a batch stops decoding rows nobody reads."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


CLOSE = {"Connection": "close"}
"""On every refusal: a body the server did not read (a wrong key, a body past the limit) may still be
arriving, and the connection is closed rather than left to read and discard it."""


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=CLOSE)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code)
    return JSONResponse(error.body(), status_code=exc.status_code, headers={**(exc.headers or {}), **CLOSE})


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    error = ApiError(500, "internal server error", None, None, "server_error")
    return JSONResponse(error.body(), status_code=500)
