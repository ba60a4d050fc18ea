"""What every translator works in: the Anthropic Messages API as the gateway's inner language.

A request in the client's schema is parsed into an Anthropic Messages request (a dict); the
provider's side builds its own request from that. Replies come back the other way: the provider's
bytes are decoded into Anthropic events (streams) or an Anthropic Message (JSON), which the
client's side encodes into its schema. The usage meter (router/usage.py) reads the Anthropic
form, so every provider is metered by the same rules as the passthrough Lua meter.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import orjson

Json = dict[str, Any]
Event = Json  # one Anthropic stream event: {"type": "message_start", ...}

# Anthropic error types by HTTP status, for providers whose errors are not Anthropic-shaped.
STATUS_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 422: "invalid_request_error",
    429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
    504: "timeout_error", 529: "overloaded_error",
}


class TranslationError(Exception):
    """A client request that cannot be expressed to the provider: a 400 in the client's shape."""

    def __init__(self, message: str, status: int = 400, err_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type


@dataclass
class Upstream:
    """The request to send to the provider for one attempt."""

    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # set (overwriting)
    remove: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ProviderError:
    status: int
    err_type: str
    message: str


def loads_object(body: bytes, what: str) -> Json:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise TranslationError(f"request body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise TranslationError(f"request body must be a JSON object ({what})")
    return doc


def sse(event: str, data: Json) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class SseParser:
    """Incremental SSE parser: bytes in, (event name, data text) out, for any chunking."""

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buf += chunk
        out: list[tuple[str, str]] = []
        while True:
            i = self._buf.find(b"\n")
            if i < 0:
                break
            line = self._buf[:i].rstrip(b"\r").decode("utf-8", "replace")
            self._buf = self._buf[i + 1:]
            if not line:
                if self._data:
                    out.append((self._event, "\n".join(self._data)))
                self._event, self._data = "", []
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    self._event = value
                elif name == "data":
                    self._data.append(value)
        return out

    def finish(self) -> list[tuple[str, str]]:
        out = self.feed(b"\n\n") if self._buf or self._data else []
        return out


class ProviderSide(ABC):
    """One provider schema: builds its request from an Anthropic one, decodes its replies."""

    # The reply to a streamed request is an SSE stream of Anthropic events as it comes (Vertex),
    # so no decoding beyond SSE is needed.
    @abstractmethod
    async def build(self, req: Json, streaming: bool) -> Upstream: ...

    @abstractmethod
    def stream_decoder(self) -> StreamDecoder: ...

    @abstractmethod
    def message(self, body: bytes, model: str) -> Json:
        """The Anthropic Message of a successful non-streamed reply."""

    @abstractmethod
    def error(self, status: int, headers: dict[str, str], body: bytes) -> ProviderError: ...

    # Whether the provider sends keep-alives of its own (Anthropic-style `ping`).
    sends_pings: bool = False


class StreamDecoder(ABC):
    """Provider stream bytes -> Anthropic events."""

    @abstractmethod
    def feed(self, chunk: bytes) -> list[Event]: ...

    @abstractmethod
    def finish(self) -> list[Event]: ...


class ClientSide(ABC):
    """One client schema: parses its request into an Anthropic one, encodes replies for it."""

    stream_content_type: str = "text/event-stream; charset=utf-8"

    @abstractmethod
    def parse(self, body: bytes, path: str, model: str | None) -> tuple[Json, bool]:
        """(the Anthropic request, streaming?)."""

    @abstractmethod
    def stream_encoder(self) -> StreamEncoder: ...

    @abstractmethod
    def message(self, msg: Json) -> bytes: ...

    @abstractmethod
    def error(self, status: int, err_type: str, message: str) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of an error in this client's schema."""


class StreamEncoder(ABC):
    """Anthropic events -> client stream bytes."""

    @abstractmethod
    def encode(self, events: list[Event]) -> bytes: ...

    def ping(self) -> bytes:
        """A keep-alive the client understands, or b"" when its schema has none."""
        return b""


def anthropic_error(status: int, body: bytes) -> ProviderError:
    """An Anthropic-shaped (or any JSON) error body; the type falls back to the status's."""
    etype, message = STATUS_ERROR_TYPES.get(status, "api_error"), ""
    try:
        doc = orjson.loads(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            if isinstance(err.get("type"), str) and err["type"].endswith("_error"):
                etype = err["type"]
            message = str(err.get("message") or "")
        elif isinstance(doc, dict):
            message = str(doc.get("message") or doc.get("Message") or "")
    except (orjson.JSONDecodeError, AttributeError):
        message = body[:500].decode("utf-8", "replace")
    return ProviderError(status, etype, message or f"provider replied {status}")


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)
