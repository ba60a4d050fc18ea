"""Provider side: the Anthropic API itself, for clients that speak another schema (OpenAI Chat
Completions, Bedrock InvokeModel). Envoy's credential injector adds the key after the adapter,
as on the passthrough cluster; Anthropic clients never come this way (router/resources.py)."""

from __future__ import annotations

import orjson

from router.adapter.translators.base import (
    Event,
    Json,
    ProviderError,
    ProviderSide,
    SseParser,
    StreamDecoder,
    Upstream,
    anthropic_error,
)

API_VERSION = "2023-06-01"


class AnthropicSseDecoder(StreamDecoder):
    """Anthropic SSE -> events (also Vertex's streamRawPredict, which streams the same events)."""

    def __init__(self) -> None:
        self._sse = SseParser()

    @staticmethod
    def _events(items: list[tuple[str, str]]) -> list[Event]:
        out: list[Event] = []
        for _, data in items:
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("type"), str):
                out.append(doc)
        return out

    def feed(self, chunk: bytes) -> list[Event]:
        return self._events(self._sse.feed(chunk))

    def finish(self) -> list[Event]:
        return self._events(self._sse.finish())


def anthropic_body(req: Json, streaming: bool, drop: tuple[str, ...] = ()) -> Json:
    body = {k: v for k, v in req.items() if not k.startswith("_") and k not in drop}
    if streaming:
        body["stream"] = True
    else:
        body.pop("stream", None)
    return body


class AnthropicApi(ProviderSide):
    sends_pings = True

    async def build(self, req: Json, streaming: bool) -> Upstream:
        headers = {"content-type": "application/json", "anthropic-version": API_VERSION,
                   "accept": "text/event-stream" if streaming else "application/json"}
        betas = req.get("_betas")
        if betas:
            headers["anthropic-beta"] = ",".join(betas)
        return Upstream("/v1/messages", orjson.dumps(anthropic_body(req, streaming)), headers)

    def stream_decoder(self) -> StreamDecoder:
        return AnthropicSseDecoder()

    def message(self, body: bytes, model: str) -> Json:
        doc = orjson.loads(body)
        if not isinstance(doc, dict) or doc.get("type") != "message":
            raise ValueError("reply is not a Message")
        return doc

    def error(self, status: int, headers: dict[str, str], body: bytes) -> ProviderError:
        return anthropic_error(status, body)
