"""The HTTP server: OpenAI-compatible completions and chat completions, where `model` names the task (tenant).

POST /v1/completions, POST /v1/chat/completions (`stream: true` for server-sent events ending with
`data: [DONE]`), GET /v1/models, GET /health. Errors are JSON in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with a 4xx status for a bad request.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from loramix.serve.batcher import Batcher, Ticket
from loramix.serve.decoding import Completion
from loramix.serve.engine import Engine, RequestError
from loramix.serve.schemas import ChatBody, CompletionBody

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server's limit

Chunk = Callable[[str | None, str | None], dict]


def create_app(
    engine: Engine, *, max_batch_size: int = 16, batch_window_ms: float = 5.0, max_pending: int = 1024
) -> FastAPI:
    """The FastAPI app serving `engine`; its batching loop runs while the app is up (lifespan)."""
    batcher = Batcher(engine, max_batch_size=max_batch_size, window_s=batch_window_ms / 1000, max_pending=max_pending)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="loramix", summary="Many tenants (tasks) of one backbone", lifespan=lifespan)
    app.state.engine, app.state.batcher = engine, batcher
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": task, "object": "model", "created": 0, "owned_by": "loramix"} for task in engine.tasks],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        default = min(COMPLETION_DEFAULT_MAX_TOKENS, engine.max_new_tokens)
        ticket = _submit(batcher, body, engine.encode_prompt(body.prompt), body.max_tokens or default, "prompt")
        identity = _identity("cmpl", body.model)

        def chunk(text: str | None, finish_reason: str | None) -> dict:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            return {**identity, "object": "text_completion", "choices": [choice]}

        if body.stream:
            return _event_stream(ticket, chunk)
        completion = await ticket.result()
        return {**chunk(completion.text, completion.finish_reason), "usage": _usage(completion)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        messages = [message.model_dump() for message in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens
        ticket = _submit(batcher, body, engine.encode_chat(messages), max_tokens, "messages")
        identity = _identity("chatcmpl", body.model)

        def chunk(text: str | None, finish_reason: str | None) -> dict:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**identity, "object": "chat.completion.chunk", "choices": [choice]}

        if body.stream:
            opening = chunk(None, None)
            opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return _event_stream(ticket, chunk, opening)
        completion = await ticket.result()
        message = {"role": "assistant", "content": completion.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": completion.finish_reason}
        return {**identity, "object": "chat.completion", "choices": [choice], "usage": _usage(completion)}

    return app


def _submit(batcher: Batcher, body, prompt_ids: list[int], max_tokens: int | None, prompt_param: str) -> Ticket:
    request = batcher.engine.request(
        body.model,
        prompt_ids,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_strings(),
        seed=body.seed,
        prompt_param=prompt_param,
    )
    return batcher.submit(request, stream=body.stream)


def _identity(prefix: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def _usage(completion: Completion) -> dict:
    generated = len(completion.token_ids)
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": completion.prompt_tokens + generated,
    }


def _event_stream(ticket: Ticket, chunk: Chunk, opening: dict | None = None) -> StreamingResponse:
    """Server-sent events: [opening], a chunk per text piece, one with the finish reason, then [DONE]."""

    async def events() -> AsyncIterator[str]:
        try:
            if opening is not None:
                yield _event(opening)
            try:
                async for piece in ticket.pieces():
                    yield _event(chunk(piece, None))
                yield _event(chunk(None, ticket.completion.finish_reason))
            except RequestError as error:
                yield _event(error.body())
            yield "data: [DONE]\n\n"
        finally:  # the client may have gone: stop generating for it
            ticket.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style JSON body: 400 for malformed or ill-typed input, 404 for an unknown
    model or path, 500 (never a crash) for a failure of the server."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
        else:
            param = ".".join(location) or None
            message = f"{param or 'body'}: {first.get('msg')}"
        return JSONResponse(RequestError(message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        body = RequestError(str(error.detail), status=error.status_code).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def failure(request: Request, error: Exception) -> JSONResponse:
        body = RequestError(f"internal error: {type(error).__name__}: {error}", kind="server_error").body()
        return JSONResponse(body, status_code=500)
