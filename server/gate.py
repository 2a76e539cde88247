"""`Gate`: the ASGI layer in front of the app. It counts every request by endpoint and status,
caps request bodies, checks API keys (all but /health) and applies the rate limit, answering
refusals itself in OpenAI's error shape."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llmx.server.guards import key_matches

if TYPE_CHECKING:
    from llmx.server.app import Server

OPEN_PATHS = {"/health"}
KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
               "/tokenize", "/detokenize", "/v1/ws"}


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


class Gate:
    def __init__(self, app: Any, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        statuses: list[int] = []

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            await send(message)

        try:
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
                return
            refusal = self._refusal(scope)
            if refusal is not None:
                await _reply(counted_send, *refusal)
                return
            replay = await self._read_body(scope, receive)
            if replay is None:
                await _reply(counted_send, 413, error_body(
                    f"the request body is larger than {self.server.config.max_body_bytes} bytes",
                    "invalid_request_error", "body_too_large"))
                return
            await self.app(scope, replay, counted_send)
        finally:
            status = str(statuses[0]) if statuses else "101" if scope["type"] == "websocket" else "499"
            self.server.metrics.requests.labels(endpoint, status).inc()

    async def _websocket(self, scope: dict, receive: Any, send: Any) -> None:
        if self._refusal(scope) is not None:
            await send({"type": "websocket.close", "code": 1008})  # before accept: a 403 to the client
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: dict) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        """(status, body, headers) when auth or the rate limit refuses the request."""
        if scope.get("path") in OPEN_PATHS:
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        token = headers.get("authorization", "")
        token = token[7:].strip() if token[:7].lower() == "bearer " else ""
        keys = self.server.config.api_keys
        if keys and not key_matches(token, keys):
            message = "invalid API key" if token else "an API key is required: send Authorization: Bearer KEY"
            return 401, error_body(message, "invalid_request_error", "invalid_api_key"), {}
        limiter = self.server.limiter
        if limiter is not None:
            client = token or str((scope.get("client") or ("local",))[0])
            wait = limiter.retry_after(client)
            if wait:
                body = error_body(f"rate limit reached; retry in {wait} s", "rate_limit_error", "rate_limit_exceeded")
                return 429, body, {"retry-after": str(wait)}
        return None

    async def _read_body(self, scope: dict, receive: Any) -> Any:
        """The whole body, at most the cap (None beyond), then a `receive` that replays it and
        passes later messages (the client's disconnect) through."""
        cap = self.server.config.max_body_bytes
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > cap:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay(b"", receive, first=message)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                return None
            if not message.get("more_body"):
                return _replay(b"".join(chunks), receive)


def _replay(body: bytes, receive: Any, first: dict | None = None) -> Any:
    pending = [first or {"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict:
        return pending.pop() if pending else await receive()

    return replayed


async def _reply(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})
