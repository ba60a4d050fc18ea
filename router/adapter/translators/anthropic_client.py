"""Client side: the Anthropic Messages API (SDKs, Claude Code) served by a translated provider."""

from __future__ import annotations

import orjson

from ccr.errors import error_body
from router.adapter.translators.base import ClientSide, Event, Json, StreamEncoder, loads_object, sse


class AnthropicSseEncoder(StreamEncoder):
    def encode(self, events: list[Event]) -> bytes:
        return b"".join(sse(str(e["type"]), e) for e in events)

    def ping(self) -> bytes:
        return sse("ping", {"type": "ping"})


class AnthropicClient(ClientSide):
    def parse(self, body: bytes, path: str, model: str | None) -> tuple[Json, bool]:
        req = loads_object(body, "a Messages request")
        return req, req.get("stream") is True

    def stream_encoder(self) -> StreamEncoder:
        return AnthropicSseEncoder()

    def message(self, msg: Json) -> bytes:
        return orjson.dumps(msg)

    def error(self, status: int, err_type: str, message: str) -> tuple[int, dict[str, str], bytes]:
        return status, {"content-type": "application/json"}, error_body(err_type, message)
