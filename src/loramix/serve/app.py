"""The HTTP server: OpenAI-compatible completions and chat completions, where `model` names the task (tenant).

POST /v1/completions, POST /v1/chat/completions (`stream: true` for server-sent events ending with
`data: [DONE]`; `logprobs` as OpenAI answers them), GET /v1/models, GET /health, GET /metrics (Prometheus text),
and vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST /v1/unload_lora_adapter {"lora_name"}.
With an API key, every /v1 route needs `Authorization: Bearer KEY` (401 otherwise); /health and /metrics stay
open, as in vLLM. Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx
status for a bad request. A client that disconnects frees its row at the next decoding step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from loramix.serve.decoding import Completion, TokenLogprob
from loramix.serve.engine import Engine, RequestError
from loramix.serve.metrics import Metrics
from loramix.serve.scheduler import Scheduler, Ticket
from loramix.serve.schemas import ChatBody, CompletionBody, LoadAdapterBody, UnloadAdapterBody

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server's limit
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there

Chunk = Callable[[str | None, str | None, list[TokenLogprob] | None], dict]


def create_app(
    engine: Engine, *, max_batch_size: int = 16, max_pending: int = 1024, api_key: str | None = None
) -> FastAPI:
    """The FastAPI app serving `engine`; its scheduler runs while the app is up (lifespan). `app.state.scheduler`
    `.close()` starts a drain: new requests get 503, those running finish."""
    metrics = Metrics()
    scheduler = Scheduler(engine, max_batch_size=max_batch_size, max_pending=max_pending, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="loramix", summary="Many tenants (tasks) of one backbone", lifespan=lifespan)
    app.state.engine, app.state.scheduler, app.state.metrics = engine, scheduler, metrics
    _add_error_handlers(app)
    if api_key:
        app.add_middleware(_RequireApiKey, api_key=api_key)
    logprob_text = _LogprobText(engine.tokenizer)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": 0, "owned_by": "loramix"} for model in engine.model_ids
            ],
        }

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterBody) -> Response:
        await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterBody) -> Response:
        await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        default = min(COMPLETION_DEFAULT_MAX_TOKENS, engine.max_new_tokens)
        ticket = await _submit(scheduler, body, engine.encode_prompt(body.prompt), body.max_tokens or default, "prompt")
        identity = _identity("cmpl", body.model)
        offsets = [0]  # where the next token's text starts in the completion

        def chunk(text: str | None, finish_reason: str | None, logprobs: list[TokenLogprob] | None) -> dict:
            report = None if logprobs is None else logprob_text.completion(logprobs, offsets)
            choice = {"index": 0, "text": text or "", "logprobs": report, "finish_reason": finish_reason}
            return {**identity, "object": "text_completion", "choices": [choice]}

        if body.stream:
            return _event_stream(ticket, chunk)
        completion = await _completion(ticket, request)
        if completion is None:
            return Response(status_code=499)
        return {**chunk(completion.text, completion.finish_reason, completion.logprobs), "usage": _usage(completion)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        messages = [message.model_dump() for message in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens
        ticket = await _submit(scheduler, body, engine.encode_chat(messages), max_tokens, "messages")
        identity = _identity("chatcmpl", body.model)

        def report(logprobs: list[TokenLogprob] | None) -> dict | None:
            return None if logprobs is None else {"content": logprob_text.chat(logprobs)}

        def chunk(text: str | None, finish_reason: str | None, logprobs: list[TokenLogprob] | None) -> dict:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": report(logprobs), "finish_reason": finish_reason}
            return {**identity, "object": "chat.completion.chunk", "choices": [choice]}

        if body.stream:
            opening = chunk(None, None, None)
            opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return _event_stream(ticket, chunk, opening)
        completion = await _completion(ticket, request)
        if completion is None:
            return Response(status_code=499)
        message = {"role": "assistant", "content": completion.text}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": report(completion.logprobs),
            "finish_reason": completion.finish_reason,
        }
        return {**identity, "object": "chat.completion", "choices": [choice], "usage": _usage(completion)}

    return app


async def _submit(
    scheduler: Scheduler, body, prompt_ids: list[int], max_tokens: int | None, prompt_param: str
) -> Ticket:
    await asyncio.to_thread(scheduler.engine.ensure_resident, body.model)  # an adapter dropped for --max-adapters
    request = scheduler.engine.request(
        body.model,
        prompt_ids,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_strings(),
        seed=body.seed,
        logprobs=body.top_logprobs_count(),
        prompt_param=prompt_param,
    )
    return scheduler.submit(request, body.model, stream=body.stream)


async def _completion(ticket: Ticket, request: Request) -> Completion | None:
    """The ticket's completion; None (and the request cancelled) if the client disconnects first."""
    result = asyncio.ensure_future(ticket.result())
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL_S)
            if done:
                return result.result()
            if await request.is_disconnected():
                ticket.cancel()
                return None
    finally:
        result.cancel()


class _LogprobText:
    """Log-probabilities in OpenAI's shapes: each token as its text (and UTF-8 bytes for chat)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def chat(self, logprobs: list[TokenLogprob]) -> list[dict]:
        def entry(token: int, logprob: float) -> dict:
            text = self.text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return [
            entry(item.token, item.logprob) | {"top_logprobs": [entry(token, value) for token, value in item.top]}
            for item in logprobs
        ]

    def completion(self, logprobs: list[TokenLogprob], offsets: list[int]) -> dict:
        """`offsets[0]`: where the first token's text starts in the completion (advanced past these tokens)."""
        tokens = [self.text(item.token) for item in logprobs]
        text_offset = []
        for token in tokens:
            text_offset.append(offsets[0])
            offsets[0] += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [item.logprob for item in logprobs],
            "top_logprobs": [{self.text(token): value for token, value in item.top} for item in logprobs],
            "text_offset": text_offset,
        }


class _RequireApiKey:
    """ASGI middleware: every /v1 route answers 401 unless the request carries `Authorization: Bearer <api_key>`.
    Plain ASGI, not BaseHTTPMiddleware, which would hide a client's disconnect from the routes behind it."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = RequestError(
                    "Incorrect or missing API key: send Authorization: Bearer <key>", status=401, code="invalid_api_key"
                )
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
        logprobs = ticket.request.logprobs is not None
        try:
            if opening is not None:
                yield _event(opening)
            try:
                async for text, tokens in ticket.pieces():
                    yield _event(chunk(text, None, tokens if logprobs else None))
                yield _event(chunk(None, ticket.completion.finish_reason, None))
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
