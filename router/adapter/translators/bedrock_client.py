"""Client side: Bedrock InvokeModel callers (Claude Code in Bedrock mode, AnthropicBedrock SDKs).

The model is the path's id, already brought to the Anthropic API's id by extauth's rules
(ccr/provider_models.py); the body is Anthropic's without `model`, with `anthropic_version` and
optional `anthropic_beta`. Streams are produced as AWS event-stream `chunk` events (or passed
through untouched when the provider is Bedrock itself: router/adapter/translators/__init__.py).
"""

from __future__ import annotations

import orjson

from ccr.provider_models import from_bedrock
from router.adapter.translators.base import ClientSide, Event, Json, StreamEncoder, TranslationError, loads_object
from router.adapter.translators.bedrock import EVENTSTREAM
from router.adapter.translators.eventstream import chunk_event

# Anthropic error type -> Bedrock exception name (x-amzn-errortype).
ERROR_EXCEPTIONS = {
    "invalid_request_error": "ValidationException", "authentication_error": "UnrecognizedClientException",
    "permission_error": "AccessDeniedException", "not_found_error": "ResourceNotFoundException",
    "rate_limit_error": "ThrottlingException", "overloaded_error": "ServiceUnavailableException",
    "timeout_error": "ModelTimeoutException", "request_too_large": "ValidationException",
}


class EventStreamEncoder(StreamEncoder):
    def encode(self, events: list[Event]) -> bytes:
        # ping events are Anthropic's, and Bedrock forwards them in chunks too
        return b"".join(chunk_event(e) for e in events)

    def ping(self) -> bytes:
        return chunk_event({"type": "ping"})


class BedrockClient(ClientSide):
    stream_content_type = EVENTSTREAM

    def parse(self, body: bytes, path: str, model: str | None) -> tuple[Json, bool]:
        req = loads_object(body, "an InvokeModel body")
        parts = path.split("?", 1)[0].split("/")
        if len(parts) != 4 or parts[1] != "model":
            raise TranslationError(f"not a Bedrock InvokeModel path: {path}")
        if "model" in req:
            raise TranslationError("model: Extra inputs are not permitted (the model is in the URL)")
        req.pop("anthropic_version", None)
        betas = req.pop("anthropic_beta", None)
        if betas:
            req["_betas"] = [str(b) for b in betas] if isinstance(betas, list) else [str(betas)]
        req["model"] = model or from_bedrock(parts[2].replace("%3A", ":").replace("%3a", ":"))
        streaming = parts[3] == "invoke-with-response-stream"
        req.pop("stream", None)
        return req, streaming

    def stream_encoder(self) -> StreamEncoder:
        return EventStreamEncoder()

    def message(self, msg: Json) -> bytes:
        return orjson.dumps(msg)

    def error(self, status: int, err_type: str, message: str) -> tuple[int, dict[str, str], bytes]:
        name = ERROR_EXCEPTIONS.get(err_type, "InternalServerException")
        return status, {"content-type": "application/json", "x-amzn-errortype": name}, \
            orjson.dumps({"message": message})
