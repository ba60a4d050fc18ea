"""Provider side: Anthropic models on Google Vertex AI (rawPredict, streamRawPredict).

The body is the Messages body without `model` (it is in the URL, spelled the Vertex way:
"claude-sonnet-4-5@20250929"), with `anthropic_version: vertex-2023-10-16`; streams are Anthropic
SSE as they are. The bearer token is an OAuth access token minted from a service-account key by
google-auth, held by the adapter process only and refreshed before it expires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
from google.auth.transport.urllib3 import Request as Urllib3Request
from google.oauth2 import service_account

from ccr.provider_models import to_vertex
from router.adapter.translators.anthropic_api import AnthropicSseDecoder, anthropic_body
from router.adapter.translators.base import Json, ProviderError, ProviderSide, StreamDecoder, Upstream, anthropic_error

VERTEX_VERSION = "vertex-2023-10-16"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


class TokenSource:
    """An access token from service-account credentials, refreshed `margin_s` before it expires.

    `clock` (seconds since the epoch) is injectable so tests can move time; refreshes are serialised
    so concurrent requests near expiry mint one token, not many.
    """

    def __init__(self, credentials: service_account.Credentials, margin_s: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._creds = credentials
        self._margin = margin_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self.refreshes = 0

    @classmethod
    def from_file(cls, path: str, **kw: object) -> TokenSource:
        creds = service_account.Credentials.from_service_account_file(path, scopes=list(SCOPES))
        return cls(creds, **kw)  # type: ignore[arg-type]

    def _fresh(self) -> bool:
        exp = self._creds.expiry  # naive UTC datetime, as google-auth keeps it
        if not self._creds.token or exp is None:
            return False
        return self._clock() < exp.replace(tzinfo=UTC).timestamp() - self._margin

    async def token(self) -> str:
        if not self._fresh():
            async with self._lock:
                if not self._fresh():
                    import urllib3

                    await asyncio.to_thread(self._creds.refresh, Urllib3Request(urllib3.PoolManager()))
                    self.refreshes += 1
        return str(self._creds.token)

    def expires_at(self) -> datetime | None:
        return self._creds.expiry


def vertex_path(project: str, region: str, model: str, streaming: bool) -> str:
    verb = "streamRawPredict" if streaming else "rawPredict"
    return f"/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model}:{verb}"


class Vertex(ProviderSide):
    sends_pings = True  # streamRawPredict streams the model's own events, pings included

    def __init__(self, project: str, region: str, tokens: TokenSource, model_ids: dict[str, str] | None = None
                 ) -> None:
        self.project = project
        self.region = region
        self._tokens = tokens
        self._model_ids = model_ids or {}

    async def build(self, req: Json, streaming: bool) -> Upstream:
        body = anthropic_body(req, streaming, drop=("model",))
        body["anthropic_version"] = VERTEX_VERSION
        path = vertex_path(self.project, self.region, to_vertex(str(req["model"]), self._model_ids), streaming)
        headers = {"content-type": "application/json", "authorization": f"Bearer {await self._tokens.token()}",
                   "accept": "text/event-stream" if streaming else "application/json"}
        if req.get("_betas"):
            headers["anthropic-beta"] = ",".join(req["_betas"])
        return Upstream(path, orjson.dumps(body), headers, remove=["anthropic-version"])

    def stream_decoder(self) -> StreamDecoder:
        return AnthropicSseDecoder()

    def message(self, body: bytes, model: str) -> Json:
        doc = orjson.loads(body)
        if not isinstance(doc, dict) or doc.get("type") != "message":
            raise ValueError("reply is not a Message")
        doc["model"] = model
        return doc

    def error(self, status: int, headers: dict[str, str], body: bytes) -> ProviderError:
        # Vertex answers in the Anthropic shape from the model, or Google's {"error": {"code", "message",
        # "status"}} from its own front end (typed by its HTTP status then).
        return anthropic_error(status, body)
