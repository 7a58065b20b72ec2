"""Fixtures for the data tests: a local HTTP server serving good, failing and hostile responses."""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.data.tiny_inputs import image_bytes


class _Handler(BaseHTTPRequestHandler):
    """Routes of the test server; `server.hits` counts requests per path."""

    def log_message(self, *args) -> None:  # noqa: ANN002 - keep test output quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        hits: Counter = self.server.hits  # type: ignore[attr-defined]
        hits[self.path] += 1
        route = self.path.split("?")[0]
        ok = self.server.image  # type: ignore[attr-defined]
        if route == "/ok.png":
            self._send(200, ok, {"Content-Type": "image/png"})
        elif route == "/missing":
            self._send(404)
        elif route == "/flaky":  # 500 on the first request, then the image
            self._send(500) if hits[self.path] == 1 else self._send(200, ok)
        elif route == "/busy":  # 429 with Retry-After on the first request
            self._send(429, b"", {"Retry-After": "0"}) if hits[self.path] == 1 else self._send(200, ok)
        elif route == "/broken":  # always 503
            self._send(503)
        elif route == "/slow":
            time.sleep(1.0)
            self._send(200, ok)
        elif route == "/huge":  # no Content-Length: the cap must trip while streaming
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
        elif route == "/huge-declared":
            self._send(200, b"x", {"Content-Length": str(10**9)})
        elif route == "/to-file":
            self._send(302, b"", {"Location": "file:///etc/passwd"})
        elif route == "/to-ok":
            self._send(302, b"", {"Location": "/ok.png"})
        elif route == "/ua":
            self._send(200, self.headers.get("User-Agent", "").encode())
        elif route == "/corrupt":
            self._send(200, b"this is not an image at all")
        elif route == "/trickle":  # one byte every 20 ms: every read is prompt, the body never ends
            self.send_response(200)
            self.end_headers()
            for _ in range(500):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.02)
        elif route == "/silent":  # accepts the request, never answers
            time.sleep(3.0)
        elif route == "/to-ftp":
            self._send(301, b"", {"Location": "ftp://127.0.0.1/a.jpg"})
        elif route == "/loop":  # redirects to itself forever
            self._send(302, b"", {"Location": "/loop"})
        else:
            self._send(404)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        pass  # clients abort on purpose (timeouts, size caps): broken pipes are expected


@pytest.fixture
def http_server(monkeypatch):
    """Base URL of a local test server (see `_Handler`); `.hits` counts requests per path."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    server.hits = Counter()
    server.image = image_bytes("PNG", (10, 7), (20, 120, 220))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()

    class Base(str):
        hits = server.hits

    yield Base(f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()
