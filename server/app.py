"""The OpenAI-compatible HTTP app: handlers validate with pydantic and call the engines.

Every error answers in OpenAI's shape, `{"error": {"message", "type", "code"}}`, with a 4xx for
anything the client can fix; a client that goes away cancels its request, whose KV blocks are
free after the engine's next step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest

from llmx.engine.engine import Engine, Request
from llmx.errors import LlmxError
from llmx.server.gate import Gate, error_body
from llmx.server.guards import RateLimiter, ResponseCache
from llmx.server.metrics import Metrics
from llmx.server.registry import ModelRegistry, UnknownModel
from llmx.server.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    Sampling,
    TokenizeRequest,
)


@dataclass(frozen=True)
class ServeConfig:
    api_keys: tuple[str, ...] = ()
    rate_limit: int = 0  # requests per minute per key (per client address without keys); 0: none
    max_queue: int = 64  # waiting requests per model beyond which new ones get 503
    response_cache: int = 0  # deterministic responses kept
    max_body_bytes: int = 1 << 20


class Overloaded(LlmxError):
    pass


class BadRequest(LlmxError):
    pass


class Server:
    """The state behind the routes: the models, the guards, the metrics."""

    def __init__(self, registry: ModelRegistry, config: ServeConfig):
        self.registry = registry
        self.config = config
        self.cache = ResponseCache(config.response_cache)
        self.limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
        self.metrics = Metrics(registry.loaded, lambda: self.cache.hits)

    def engine(self, name: str | None) -> tuple[str, Engine]:
        name = self.registry.resolve(name)
        return name, self.registry.engine(name)

    def submit(self, name: str, engine: Engine, prompt: str | list[int], body: Sampling,
               logprobs: int | None) -> Request:
        if engine.queued(extra=1) > self.config.max_queue:
            raise Overloaded(f"the server is busy: {engine.queued()} requests are waiting for {name}; retry later")
        max_tokens = body.limit(engine.model.ctx)
        return engine.submit(prompt, max_tokens=max_tokens, stop=body.stop, logprobs=logprobs,
                             response_format=body.output_format(), **body.sampling())


def create_app(registry: ModelRegistry, config: ServeConfig) -> FastAPI:
    server = Server(registry, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        registry.close()

    app = FastAPI(title="llmx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _errors(app)
    _routes(app, server)
    return Gate(app, server)


# -- errors ----------------------------------------------------------------------------------


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(_validation_message(exc.errors()), "invalid_request_error"), 400)

    @app.exception_handler(UnknownModel)
    async def unknown(_, exc: UnknownModel) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error", "model_not_found"), 404)

    @app.exception_handler(Overloaded)
    async def busy(_, exc: Overloaded) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "server_overloaded", "server_busy"), 503)

    @app.exception_handler(LlmxError)
    async def refused(_, exc: LlmxError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error"), 400)

    @app.exception_handler(HTTPException)
    async def http(_, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = str(first.get("msg", "invalid request"))
    return f"{where}: {message}" if where else message


# -- routes ----------------------------------------------------------------------------------


def _routes(app: FastAPI, server: Server) -> None:
    registry = server.registry

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": registry.created, "owned_by": "llmx", "path": str(path)}
            for name, path in registry.paths.items()]}

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest) -> Response:
        body = await _parse(http, ChatRequest)
        name, engine = await _engine(server, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = await asyncio.to_thread(engine.model.chat_prompt, messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await _generate(server, "chat", name, engine, prompt, body, top)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Response:
        body = await _parse(http, CompletionRequest)
        name, engine = await _engine(server, body.model)
        return await _generate(server, "completion", name, engine, body.prompt, body, body.logprobs)

    @app.post("/v1/embeddings")
    async def embeddings(http: HttpRequest) -> dict[str, Any]:
        body = await _parse(http, EmbeddingRequest)
        name, engine = await _engine(server, body.model)
        model = engine.model
        ids = [model.tokenize(i) if isinstance(i, str) else list(i) for i in body.items()]
        vectors = [await asyncio.to_thread(model.embedding, one) for one in ids]
        n = sum(len(i) for i in ids)
        return {"object": "list", "model": name, "usage": {"prompt_tokens": n, "total_tokens": n},
                "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                         for i, v in enumerate(vectors)]}

    @app.post("/tokenize")
    async def tokenize(http: HttpRequest) -> dict[str, Any]:
        body = await _parse(http, TokenizeRequest)
        _, engine = await _engine(server, body.model)
        return {"tokens": engine.model.tokenize(body.content, add_bos=body.add_special, special=body.parse_special)}

    @app.post("/detokenize")
    async def detokenize(http: HttpRequest) -> dict[str, Any]:
        body = await _parse(http, DetokenizeRequest)
        _, engine = await _engine(server, body.model)
        n_vocab = engine.model.config.n_vocab
        if any(not 0 <= t < n_vocab for t in body.tokens):
            raise LlmxError(f"token ids must be in 0..{n_vocab - 1}")
        return {"content": engine.model.detokenize(body.tokens)}

    @app.websocket("/v1/ws")
    async def websocket(ws: WebSocket) -> None:
        await ws.accept()
        await _websocket_session(server, ws)


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    """A list of floats, or (the openai client's default) base64 of little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


async def _parse(http: HttpRequest, schema: type[BaseModel]) -> Any:
    """The JSON body as `schema`, whatever the Content-Type says (curl -d sends a form's)."""
    raw = await http.body()
    try:
        data = json.loads(raw)
        raw.decode("utf-8")
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\\ud800") are not text
    except (json.JSONDecodeError, UnicodeError, RecursionError) as e:
        raise BadRequest(f"the body is not valid UTF-8 JSON: {e}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise BadRequest(_validation_message(e.errors())) from None


async def _engine(server: Server, name: str | None) -> tuple[str, Engine]:
    """The named model's engine; loading one is slow, so it happens off the event loop."""
    return await asyncio.to_thread(server.engine, name)


# -- generation ------------------------------------------------------------------------------


async def _generate(server: Server, kind: str, name: str, engine: Engine, prompt: str | list[int], body: Sampling,
                    logprobs: int | None) -> Response:
    cache_key = None
    if not body.stream and server.cache.size and body.deterministic:
        cache_key = ResponseCache.key(kind, name, body.model_dump())
        hit = server.cache.get(cache_key)
        if hit is not None:
            return Response(hit, media_type="application/json", headers={"x-llmx-cache": "hit"})
    request = await _submit(server, name, engine, prompt, body, logprobs)
    shape = _Shape(kind, name, engine, request, echo=getattr(body, "echo", False) and isinstance(prompt, str),
                   prompt=prompt)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(server, shape, usage), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})
    try:
        async for _ in request.stream():
            pass
    finally:
        request.cancel()  # (a client gone mid-request: free its blocks)
    server.metrics.finished(name, request)
    payload = json.dumps(shape.whole(), ensure_ascii=False).encode()
    if cache_key is not None and request.finish_reason in ("stop", "length"):  # not one cut short
        server.cache.put(cache_key, payload)
    return Response(payload, media_type="application/json", headers={"x-llmx-cache": "miss"} if cache_key else None)


async def _submit(server: Server, name: str, engine: Engine, prompt: str | list[int], body: Sampling,
                  logprobs: int | None) -> Request:
    """`server.submit`; one with a grammar off the event loop (compiling it takes a while, the first
    one also builds the tokenizer view, ~1 s), and cancelled once made if the client left meanwhile."""
    if body.output_format() is None:
        return server.submit(name, engine, prompt, body, logprobs)
    future = asyncio.get_running_loop().run_in_executor(None, server.submit, name, engine, prompt, body, logprobs)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda done: done.exception() is None and done.result().cancel())
        raise


async def _sse(server: Server, shape: _Shape, usage: bool) -> AsyncIterator[bytes]:
    request = shape.request
    try:
        yield _event(shape.chunk(role=True))
        async for piece in request.stream():
            yield _event(shape.chunk(piece))
        yield _event(shape.chunk(finish=True))
        if usage:
            yield _event({**shape.chunk(), "choices": [], "usage": request.usage})
        yield b"data: [DONE]\n\n"
    except LlmxError as e:
        yield _event(error_body(str(e), "server_error"))
    finally:
        request.cancel()  # (a client gone mid-stream: free its blocks)
        if request.finished:
            server.metrics.finished(shape.name, request)


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


class _Shape:
    """OpenAI's JSON for one request: whole responses and stream chunks, chat or completion."""

    def __init__(self, kind: str, name: str, engine: Engine, request: Request, echo: bool, prompt: Any):
        self.kind, self.name, self.request = kind, name, request
        self.tokenizer = engine.model.tokenizer
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.echo = prompt if echo else ""
        self._logprobs_sent = 0

    def whole(self) -> dict[str, Any]:
        r = self.request
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
                      "logprobs": self._chat_logprobs(r.logprobs) if r.logprobs is not None else None,
                      "finish_reason": _finish(r)}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": self.echo + r.text, "finish_reason": _finish(r),
                      "logprobs": self._completion_logprobs(r.logprobs) if r.logprobs is not None else None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.name, "choices": [choice],
                "usage": r.usage}

    def chunk(self, piece: str = "", role: bool = False, finish: bool = False) -> dict[str, Any]:
        r = self.request
        new = (r.logprobs or [])[self._logprobs_sent:]
        self._logprobs_sent += len(new)
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece
                                                                                       else {})
            choice = {"index": 0, "delta": delta, "finish_reason": _finish(r) if finish else None,
                      "logprobs": self._chat_logprobs(new) if r.logprobs is not None and new else None}
            obj = "chat.completion.chunk"
        else:
            text = self.echo if role else piece
            choice = {"index": 0, "text": text, "finish_reason": _finish(r) if finish else None,
                      "logprobs": self._completion_logprobs(new) if r.logprobs is not None and new else None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.name, "choices": [choice]}

    def _piece(self, token: int) -> str:
        return self.tokenizer.detokenize([token])

    def _chat_logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            text = self._piece(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**one(e["token"], e["logprob"]),
                             "top_logprobs": [one(t, lp) for t, lp in e["top_logprobs"]]} for e in entries]}

    def _completion_logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = [self._piece(e["token"]) for e in entries]
        offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist() if tokens else []
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{self._piece(t): lp for t, lp in e["top_logprobs"]} for e in entries],
                "text_offset": [len(self.echo) + o for o in offsets]}


def _finish(request: Request) -> str:
    return "length" if request.finish_reason == "length" else "stop"


# -- WebSocket ----------------------------------------------------------------------------------


async def _websocket_session(server: Server, ws: WebSocket) -> None:
    """Turns of {"messages": [...], ...} -> {"delta"} events, then {"done", "finish_reason",
    "usage"}; {"cancel": true} stops the turn under way. Many turns per connection."""
    current: Request | None = None
    turn: asyncio.Task | None = None
    try:
        while True:
            message = await ws.receive_text()
            try:
                data = json.loads(message)
            except json.JSONDecodeError:
                await ws.send_json(error_body("messages must be JSON objects", "invalid_request_error"))
                continue
            if isinstance(data, dict) and data.get("cancel"):
                if current is not None:
                    current.cancel()
                continue
            if turn is not None and not turn.done():
                await ws.send_json(error_body("a turn is under way; send {\"cancel\": true} first",
                                              "invalid_request_error"))
                continue
            try:
                json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates are not text
                current = await _start_turn(server, data)
            except (ValidationError, LlmxError, UnicodeError) as e:
                await ws.send_json(error_body(_ws_message(e), "invalid_request_error"))
                continue
            turn = asyncio.create_task(_stream_turn(ws, current))
    except WebSocketDisconnect:
        pass
    finally:
        if current is not None:
            current.cancel()
        if turn is not None:
            turn.cancel()


def _ws_message(e: Exception) -> str:
    return _validation_message(e.errors()) if isinstance(e, ValidationError) else str(e)


async def _start_turn(server: Server, data: Any) -> Request:
    body = ChatRequest.model_validate(data)
    name, engine = await _engine(server, body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = await asyncio.to_thread(engine.model.chat_prompt, messages)
    return await _submit(server, name, engine, prompt, body, None)


async def _stream_turn(ws: WebSocket, request: Request) -> None:
    try:
        async for piece in request.stream():
            await ws.send_json({"delta": piece})
        await ws.send_json({"done": True, "finish_reason": request.finish_reason, "usage": request.usage})
    except LlmxError as e:
        await ws.send_json(error_body(str(e), "server_error"))
    except (WebSocketDisconnect, RuntimeError):
        request.cancel()
