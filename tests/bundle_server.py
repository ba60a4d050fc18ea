"""A real HTTP bundle server for tests: serves bytes with strong ETags, answers If-None-Match
with 304, counts requests, can omit Content-Length (to exercise the streaming size bound), and
supports OPA's long polling (`Prefer: wait=N`: an unchanged bundle is answered when it changes,
or with 304 after N seconds)."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


class BundleServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None, int]] = []  # (path, If-None-Match, status)
        self.no_length = False
        self.token: str | None = None  # when set, requests must carry `Authorization: Bearer <token>`
        self.waiting = 0  # long polls being held right now
        self.long_poll = True  # honour `Prefer: wait=N`; False: answer at once like a plain server
        self._lock = threading.Condition()
        self._closing = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:  # noqa: N802
                inm = self.headers.get("If-None-Match")
                prefer = self.headers.get("Prefer", "")
                wait = float(prefer.removeprefix("wait=")) if prefer.startswith("wait=") else 0.0
                with server._lock:
                    if not server.long_poll:
                        wait = 0.0
                    body = server.files.get(self.path)
                    if wait and body is not None and inm == _etag(body):
                        server.waiting += 1
                        server._lock.wait_for(
                            lambda: server._closing or server.files.get(self.path) != body, timeout=wait)
                        server.waiting -= 1
                        body = server.files.get(self.path)
                    no_length = server.no_length
                    token = server.token
                etag = _etag(body) if body is not None else None
                status = 404 if body is None else 304 if inm == etag else 200
                if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                    status, body, etag = 401, None, None
                with server._lock:  # recorded before answering: a client that got the answer sees it
                    server.requests.append((self.path, inm, status))
                self.send_response(status)
                if etag is not None:
                    self.send_header("ETag", etag)
                if wait and status in (200, 304):  # says: this server long-polls
                    self.send_header("Content-Type", "application/vnd.openpolicyagent.bundles")
                elif status == 200:
                    self.send_header("Content-Type", "application/gzip")
                if status != 304 and not (status == 200 and no_length):
                    self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                if status == 200:
                    self.wfile.write(body)  # type: ignore[arg-type]

            def do_PUT(self) -> None:  # noqa: N802 - `ccr policy push`
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with server._lock:
                    ok = server.token is None or self.headers.get("Authorization") == f"Bearer {server.token}"
                    status = 201 if ok else 401
                    server.requests.append((self.path, None, status))
                    if ok:
                        server.files[self.path] = body
                        server._lock.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def put(self, path: str, body: bytes) -> None:
        with self._lock:
            self.files[path] = body
            self._lock.notify_all()

    def holding(self) -> int:
        with self._lock:
            return self.waiting

    def statuses(self) -> list[int]:
        with self._lock:
            return [s for _, _, s in self.requests]

    def __enter__(self) -> BundleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()
