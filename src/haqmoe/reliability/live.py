"""A uvicorn server in a background thread on a free loopback port (tests, fuzzing, the soak)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import uvicorn


def raw_status(url: str, request: bytes) -> int:
    """Status of a raw HTTP request (headers no client library would send: the fuzzers' own bytes);
    -1 when the server hung up without answering."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else -1


@dataclass
class ThreadedServer:
    app: object
    startup_s: float = 60.0
    url: str = ""
    _server: object = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __enter__(self) -> "ThreadedServer":
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        end = time.monotonic() + self.startup_s
        while not self._server.started:
            if time.monotonic() > end or not self._thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(15)
