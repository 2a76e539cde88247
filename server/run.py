"""Run the app with uvicorn on a TCP port and a Unix socket at once (one server, two sockets).

The Unix socket is created with mode 0600 and removed at shutdown; a socket file left by a
crashed server (nobody answers on it) is replaced, a live one is an error. SIGINT/SIGTERM stop
accepting, let running streams finish for a few seconds, then cancel them; the process exits 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from llmx.errors import LlmxError

GRACEFUL_SECONDS = 5


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=256)
    except OSError as e:
        raise LlmxError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None


def unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600; a stale file there is replaced."""
    if path.exists() or path.is_symlink():
        if answers(path):
            raise LlmxError(f"another llmx serve is listening on {path}; stop it, or pass --socket PATH or --no-socket")
        if not path.is_socket():
            raise LlmxError(f"{path} exists and is not a socket; remove it or pass --socket PATH")
        path.unlink()  # left by a server that did not shut down
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: no window where others could connect
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise LlmxError(f"cannot create the socket {path}: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(256)
    return sock


def answers(path: Path) -> bool:
    """Whether a server accepts connections on the Unix socket `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def run_server(app: Any, sockets: list[socket.socket], unix_path: Path | None, preload: Any = None) -> None:
    """Serve until SIGINT/SIGTERM; `preload` (a callable) runs in the background once listening."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SECONDS, lifespan="on",
                            ws="websockets-sansio", access_log=False)
    server = _server_class(uvicorn.Server)(config)
    if preload is not None:
        threading.Thread(target=_quietly, args=(preload,), daemon=True).start()
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        if unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                unix_path.unlink()


def _server_class(base: type) -> type:
    class Server(base):
        """uvicorn's server, minus re-raising SIGINT/SIGTERM after the graceful shutdown (which
        would make the exit status the signal's): a requested stop is a clean exit, status 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return Server


def _quietly(fn: Any) -> None:
    with contextlib.suppress(Exception):  # a model that fails to load fails its first request instead
        fn()
