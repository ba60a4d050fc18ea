"""A real HTTP decision-log service for tests: takes OPA decision_logs uploads (POST, a gzip-compressed
JSON array), decodes and keeps what it accepted, answers a chosen status, can hold requests
(a hung service), and can be stopped and started again on the same port (a service that was down)."""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class DecisionLogServer:
    def __init__(self, port: int = 0) -> None:
        self.accepted: list[list[dict[str, Any]]] = []  # the batches answered with 2xx, decoded
        self.posts: list[tuple[str, dict[str, str], int]] = []  # (path, headers, status) of every POST
        self.status = 200
        self.hold = threading.Event()  # while clear, requests are held (a service that hangs)
        self.hold.set()
        self._lock = threading.Condition()
        self._port = port
        self.httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> DecisionLogServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                server.hold.wait(30)
                status = server.status
                headers = {k.lower(): v for k, v in self.headers.items()}
                events = None
                if status < 300:
                    assert headers.get("content-encoding") == "gzip", headers
                    events = json.loads(gzip.decompress(raw))
                with server._lock:
                    server.posts.append((self.path, headers, status))
                    if events is not None:
                        server.accepted.append(events)
                    server._lock.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self.httpd.daemon_threads = True
        self._port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Down: the port refuses connections until start() again."""
        if self.httpd is not None:
            self.hold.set()
            self.httpd.shutdown()
            self.httpd.server_close()
            assert self._thread is not None
            self._thread.join()
            self.httpd = None

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e for batch in self.accepted for e in batch]

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        """Wait until predicate(self) holds (re-checked on every POST)."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self), timeout)

    def __enter__(self) -> DecisionLogServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
