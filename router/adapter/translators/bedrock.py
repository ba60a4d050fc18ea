"""Provider side: Anthropic models on AWS Bedrock (InvokeModel, InvokeModelWithResponseStream).

The body is the Messages body without `model` and `stream` (the model is in the URL), with
`anthropic_version: bedrock-2023-05-31` and betas as `anthropic_beta`. Each attempt is SigV4-signed
here with botocore: the signature covers the body's hash and the final path, which Envoy's
credential injector cannot compute, so the AWS key pair lives in the adapter process (only).
Streams come back as AWS event-stream `chunk` events, each carrying one Anthropic event.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import quote

import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ccr.provider_models import to_bedrock
from router.adapter.translators.anthropic_api import anthropic_body
from router.adapter.translators.base import (
    STATUS_ERROR_TYPES,
    Event,
    Json,
    ProviderError,
    ProviderSide,
    StreamDecoder,
    Upstream,
)
from router.adapter.translators.eventstream import Decoder

BEDROCK_VERSION = "bedrock-2023-05-31"
SERVICE = "bedrock"
EVENTSTREAM = "application/vnd.amazon.eventstream"
METRICS_KEY = "amazon-bedrock-invocationMetrics"

# Bedrock exception names (x-amzn-errortype, or :exception-type in a stream) -> Anthropic error types.
EXCEPTION_TYPES = {
    "validationexception": "invalid_request_error",
    "accessdeniedexception": "permission_error",
    "unrecognizedclientexception": "authentication_error",
    "invalidsignatureexception": "authentication_error",
    "resourcenotfoundexception": "not_found_error",
    "throttlingexception": "rate_limit_error",
    "servicequotaexceededexception": "rate_limit_error",
    "modeltimeoutexception": "timeout_error",
    "modelnotreadyexception": "overloaded_error",
    "serviceunavailableexception": "overloaded_error",
    "internalserverexception": "api_error",
    "modelstreamerrorexception": "api_error",
    "modelerrorexception": "api_error",
}


def exception_type(name: str, status: int) -> str:
    key = name.split(":", 1)[0].strip().lower()
    return EXCEPTION_TYPES.get(key, STATUS_ERROR_TYPES.get(status, "api_error"))


@dataclass(frozen=True)
class AwsKeys:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None


def bedrock_path(model_id: str, streaming: bool) -> str:
    # As the AWS SDKs send it: the id percent-encoded (its ':' becomes %3A).
    return f"/model/{quote(model_id, safe='')}/{'invoke-with-response-stream' if streaming else 'invoke'}"


def sign(keys: AwsKeys, region: str, host: str, path: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
    """SigV4 headers (authorization, x-amz-date, x-amz-security-token) for this exact request."""
    req = AWSRequest(method="POST", url=f"https://{host}{path}", data=body, headers=dict(headers))
    req.headers["host"] = host
    SigV4Auth(Credentials(keys.access_key_id, keys.secret_access_key, keys.session_token),
              SERVICE, region).add_auth(req)
    out = {"authorization": req.headers["Authorization"], "x-amz-date": req.headers["X-Amz-Date"]}
    if keys.session_token:
        out["x-amz-security-token"] = req.headers["X-Amz-Security-Token"]
    return out


def to_bedrock_body(req: Json) -> Json:
    body = anthropic_body(req, streaming=False, drop=("model",))
    body["anthropic_version"] = BEDROCK_VERSION
    if req.get("_betas"):
        body["anthropic_beta"] = list(req["_betas"])
    return body


class BedrockStreamDecoder(StreamDecoder):
    def __init__(self) -> None:
        self._decoder = Decoder()

    def feed(self, chunk: bytes) -> list[Event]:
        out: list[Event] = []
        for msg in self._decoder.feed(chunk):
            h = msg.headers
            if h.get(":message-type") == "exception" or h.get(":message-type") == "error":
                name = str(h.get(":exception-type") or h.get(":error-code") or "internalServerException")
                try:
                    text = str(orjson.loads(msg.payload).get("message", ""))
                except (orjson.JSONDecodeError, AttributeError):
                    text = msg.payload[:300].decode("utf-8", "replace")
                out.append({"type": "error", "error": {"type": exception_type(name, 500), "message": text}})
                continue
            if h.get(":event-type") != "chunk":
                continue
            try:
                event = orjson.loads(base64.b64decode(orjson.loads(msg.payload)["bytes"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if isinstance(event, dict) and isinstance(event.get("type"), str):
                event.pop(METRICS_KEY, None)
                out.append(event)
        return out

    def finish(self) -> list[Event]:
        return []


class Bedrock(ProviderSide):
    sends_pings = False  # Bedrock's event stream carries no ping events

    def __init__(self, region: str, host: str, keys: AwsKeys, model_ids: dict[str, str] | None = None) -> None:
        self.region = region
        self.host = host
        self._keys = keys
        self._model_ids = model_ids or {}

    async def build(self, req: Json, streaming: bool) -> Upstream:
        path = bedrock_path(to_bedrock(str(req["model"]), self._model_ids), streaming)
        body = orjson.dumps(to_bedrock_body(req))
        headers = {"content-type": "application/json", "accept": EVENTSTREAM if streaming else "application/json"}
        headers |= sign(self._keys, self.region, self.host, path, body, headers)
        # A client's own AWS headers must not ride along with our signature.
        remove = ["anthropic-version", "anthropic-beta", "x-amz-content-sha256", "x-amz-target"]
        if "x-amz-security-token" not in headers:
            remove.append("x-amz-security-token")
        return Upstream(path, body, headers, remove=remove)

    def stream_decoder(self) -> StreamDecoder:
        return BedrockStreamDecoder()

    def message(self, body: bytes, model: str) -> Json:
        doc = orjson.loads(body)
        if not isinstance(doc, dict) or doc.get("type") != "message":
            raise ValueError("reply is not a Message")
        doc.pop(METRICS_KEY, None)
        doc["model"] = model  # Bedrock names its own id; the client asked for the canonical one
        return doc

    def error(self, status: int, headers: dict[str, str], body: bytes) -> ProviderError:
        try:
            doc = orjson.loads(body)
            message = str(doc.get("message") or doc.get("Message") or "") if isinstance(doc, dict) else ""
        except orjson.JSONDecodeError:
            message = body[:500].decode("utf-8", "replace")
        etype = exception_type(headers.get("x-amzn-errortype", ""), status)
        return ProviderError(status, etype, message or f"Bedrock replied {status}")
