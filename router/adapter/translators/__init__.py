"""Translation between a client's schema and a provider's, per upstream attempt (the adapter).

The one place a pair is chosen: `PAIRS` maps (client schema, provider kind) to the client side
and provider side modules that serve it. Every pair goes through the Anthropic Messages form
(router/adapter/translators/base.py), which is also what the usage meter reads. Anthropic clients
of an Anthropic provider never get here: that passthrough is byte-faithful and runs no Python
(router/resources.py). A Bedrock client of a Bedrock provider gets the provider's event stream
unchanged (it is only decoded, for metering).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from ccr.config import ProviderKind
from router.adapter.translators.anthropic_client import AnthropicClient, AnthropicSseEncoder
from router.adapter.translators.base import ClientSide, Event, Json, ProviderSide, TranslationError, Upstream
from router.adapter.translators.bedrock_client import BedrockClient
from router.adapter.translators.openai_client import OpenAIClient
from router.usage import JsonUsageMeter, SseUsageMeter, UsageMeter

# (client schema, provider kind) -> (client side factory, passthrough of the provider's stream bytes)
PAIRS: dict[tuple[str, ProviderKind], tuple[Callable[[], ClientSide], bool]] = {
    ("anthropic", ProviderKind.bedrock): (AnthropicClient, False),
    ("anthropic", ProviderKind.vertex): (AnthropicClient, False),
    ("anthropic", ProviderKind.openai): (AnthropicClient, False),
    ("openai", ProviderKind.anthropic): (OpenAIClient, False),
    ("openai", ProviderKind.bedrock): (OpenAIClient, False),
    ("openai", ProviderKind.vertex): (OpenAIClient, False),
    ("openai", ProviderKind.openai): (OpenAIClient, False),
    ("bedrock", ProviderKind.anthropic): (BedrockClient, False),
    ("bedrock", ProviderKind.bedrock): (BedrockClient, True),
    ("bedrock", ProviderKind.vertex): (BedrockClient, False),
    ("bedrock", ProviderKind.openai): (BedrockClient, False),
}


def client_schema(path: str) -> str | None:
    """The client schema of a request path the gateway translates (extauth/endpoints.py names them)."""
    p = path.split("?", 1)[0]
    if p == "/v1/messages":
        return "anthropic"
    if p == "/v1/chat/completions":
        return "openai"
    if p.startswith("/model/") and (p.endswith("/invoke") or p.endswith("/invoke-with-response-stream")):
        return "bedrock"
    return None


@dataclass
class Output:
    body: bytes
    headers: dict[str, str]


class Translation:
    """One upstream attempt: the client's request to the provider, its reply back to the client."""

    def __init__(self, client: ClientSide, provider: ProviderSide, passthrough: bool, *, ping_interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.provider = provider
        self.passthrough = passthrough
        self.ping_interval_s = ping_interval_s
        self.clock = clock
        self.model = ""
        self.streaming = False
        self.meter: UsageMeter | None = None
        self._decoder = None
        self._encoder = None
        self._canon = AnthropicSseEncoder()
        self._last_out = 0.0
        self._pinged_start = False

    async def request(self, path: str, body: bytes, model: str | None) -> Upstream:
        req, self.streaming = self.client.parse(body, path, model)
        if not isinstance(req.get("model"), str) or not req["model"]:
            raise TranslationError("model: Field required")
        if not isinstance(req.get("max_tokens"), int) or isinstance(req.get("max_tokens"), bool):
            raise TranslationError("max_tokens: Field required (an integer)")
        if not isinstance(req.get("messages"), list):
            raise TranslationError("messages: Field required")
        self.model = req["model"]
        return await self.provider.build(req, self.streaming)

    # -- replies

    def start_stream(self) -> dict[str, str]:
        """Headers of a successful streamed reply; the body comes through `stream_chunk`."""
        self._decoder = self.provider.stream_decoder()
        self._encoder = self.client.stream_encoder()
        self.meter = SseUsageMeter()
        self._last_out = self.clock()
        return {"content-type": self.client.stream_content_type, "cache-control": "no-cache"}

    def stream_chunk(self, chunk: bytes, end: bool) -> tuple[bytes, bool]:
        """(bytes for the client, whether usage moved)."""
        assert self._decoder is not None and self._encoder is not None and self.meter is not None
        events: list[Event] = self._decoder.feed(chunk) if chunk else []
        if end:
            events += self._decoder.finish()
        changed = self.meter.feed(self._canon.encode(events)) if events else False
        out = chunk if self.passthrough else self._encode(events)
        if out:
            self._last_out = self.clock()
        return out, changed

    def _encode(self, events: list[Event]) -> bytes:
        assert self._encoder is not None
        parts: list[bytes] = []
        # A provider that sends no keep-alives: a ping when the client has heard nothing for the
        # interval, and one after message_start, where the Anthropic API sends its first.
        if not self.provider.sends_pings and events and self.clock() - self._last_out >= self.ping_interval_s:
            parts.append(self._encoder.ping())
        for e in events:
            parts.append(self._encoder.encode([e]))
            if e.get("type") == "message_start" and not self.provider.sends_pings and not self._pinged_start:
                self._pinged_start = True
                parts.append(self._encoder.ping())
        return b"".join(parts)

    def next_ping_in(self) -> float | None:
        """Seconds until a keep-alive is due, or None when this stream gets none from the gateway."""
        if self.provider.sends_pings or self._encoder is None or self.passthrough:
            return None
        return max(0.0, self._last_out + self.ping_interval_s - self.clock())

    def idle_ping(self) -> bytes:
        """A keep-alive if the client has heard nothing for the interval (the adapter's timer asks)."""
        due = self.next_ping_in()
        if due is None or due > 0:
            return b""
        self._last_out = self.clock()
        return self._encoder.ping()  # type: ignore[union-attr]

    def whole_reply(self, status: int, headers: dict[str, str], body: bytes) -> Output:
        """A non-streamed reply or any error reply, read whole: in the client's schema; meters it."""
        if status >= 400:
            e = self.provider.error(status, headers, body)
            st, h, b = self.client.error(e.status, e.err_type, e.message)
            return Output(b, h)
        if self.streaming:  # a 2xx with a whole body to a streamed request: not a stream we can read
            st, h, b = self.client.error(502, "api_error", "the provider answered a streamed request without a stream")
            return Output(b, h)
        try:
            msg = self.provider.message(body, self.model)
        except (ValueError, orjson.JSONDecodeError) as e:
            st, h, b = self.client.error(502, "api_error", f"the provider's reply could not be read ({e})")
            return Output(b, h)
        self.meter = JsonUsageMeter()
        self.meter.feed(orjson.dumps(msg))
        return Output(self.client.message(msg), {"content-type": "application/json"})


def translation_for(schema: str, kind: ProviderKind, provider: ProviderSide, *, ping_interval_s: float,
                    clock: Callable[[], float] = time.monotonic) -> Translation | None:
    pair = PAIRS.get((schema, kind))
    if pair is None:
        return None
    make_client, passthrough = pair
    return Translation(make_client(), provider, passthrough, ping_interval_s=ping_interval_s, clock=clock)


__all__ = ["PAIRS", "Json", "Translation", "TranslationError", "client_schema", "translation_for"]
