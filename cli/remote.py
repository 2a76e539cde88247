"""`llmx run` and `llmx chat` through a running `llmx serve` (what makes Ollama's CLI instant):
when the server answers and serves the requested model file, the request goes there instead of
loading the model. Standard library only (http.client over TCP or a Unix socket), so this path
imports neither numpy nor numba.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TIMEOUT = 600.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Remote:
    """A server at `unix:PATH` or `http://HOST:PORT`."""

    def __init__(self, address: str, api_key: str | None = None):
        self.address = address
        self.api_key = api_key

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.address.startswith("unix:"):
            return _UnixConnection(self.address[5:], timeout)
        parts = urlsplit(self.address if "://" in self.address else f"http://{self.address}")
        return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def model_name(self, path: Path) -> str | None:
        """The name under which the server serves the file `path`; None when it does not (or does
        not answer)."""
        try:
            conn = self._connection(timeout=2.0)
            conn.request("GET", "/v1/models", headers=self._headers())
            response = conn.getresponse()
            if response.status != 200:
                return None
            listing = json.loads(response.read())
        except (OSError, ValueError, http.client.HTTPException):
            return None
        for entry in listing.get("data", []):
            served = entry.get("path")
            if served and _same_file(Path(served), path):
                return str(entry["id"])
        return None

    def stream(self, endpoint: str, body: dict[str, Any], usage: dict[str, Any]) -> Iterator[str]:
        """Text pieces of a streamed completion or chat completion; `usage` gets the final usage
        and finish reason."""
        conn = self._connection(timeout=TIMEOUT)
        conn.request("POST", endpoint, json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                     headers=self._headers())
        response = conn.getresponse()
        if response.status != 200:
            from llmx.errors import LlmxError

            raise LlmxError(f"the server refused the request: {_message(response.read())}")
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                from llmx.errors import LlmxError

                raise LlmxError(f"the server failed: {event['error'].get('message')}")
            if event.get("usage"):
                usage.update(event["usage"])
            for choice in event.get("choices", []):
                piece = choice.get("text") if "text" in choice else choice.get("delta", {}).get("content")
                if choice.get("finish_reason"):
                    usage["finish_reason"] = choice["finish_reason"]
                if piece:
                    yield piece


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or a.samefile(b)
    except OSError:
        return False


def _message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")


def find_server(explicit: str | None, default_socket: Path, path: Path,
                api_key: str | None) -> tuple[Remote, str] | None:
    """The server to use and the model's name there: `explicit` (URL or unix:PATH), else the
    default socket when it exists; None when none serves `path`."""
    if explicit is None and not default_socket.exists():
        return None
    remote = Remote(explicit or f"unix:{default_socket}", api_key)
    name = remote.model_name(path)
    return (remote, name) if name is not None else None
