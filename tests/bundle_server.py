"""A real HTTP bundle server for tests: serves bytes with strong ETags, answers If-None-Match
with 304, counts requests, and can omit Content-Length (to exercise the streaming size bound)."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class BundleServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None, int]] = []  # (path, If-None-Match, status)
        self.no_length = False
        self.token: str | None = None  # when set, requests must carry `Authorization: Bearer <token>`
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:  # noqa: N802
                with server._lock:
                    body = server.files.get(self.path)
                    no_length = server.no_length
                    token = server.token
                inm = self.headers.get("If-None-Match")
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"' if body is not None else None
                status = 404 if body is None else 304 if inm == etag else 200
                if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                    status, body, etag = 401, None, None
                with server._lock:  # recorded before answering: a client that got the answer sees it
                    server.requests.append((self.path, inm, status))
                self.send_response(status)
                if etag is not None:
                    self.send_header("ETag", etag)
                if status == 200:
                    self.send_header("Content-Type", "application/gzip")
                if status != 304 and not (status == 200 and no_length):
                    self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                if status == 200:
                    self.wfile.write(body)  # type: ignore[arg-type]

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def put(self, path: str, body: bytes) -> None:
        with self._lock:
            self.files[path] = body

    def statuses(self) -> list[int]:
        with self._lock:
            return [s for _, _, s in self.requests]

    def __enter__(self) -> BundleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()
