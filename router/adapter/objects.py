"""The adapter's part in Message Batches and Files: ownership, listings, results metering.

Only requests on those endpoints get an `ObjectAttempt`; ordinary Messages traffic never
reaches this module or the database.

* Create (batch) and upload (file): the reply's id is recorded as owned by the principal
  extauth decided (`x-ccr-principal-id`) before the reply reaches the client, so the very
  next request on that id is authorised. If it cannot be recorded the client gets a 500
  rather than an object nobody can reach.
* Lists are filtered here, from the provider's own reply (the only source of current
  object state), to the caller's objects. The provider is asked for its largest page
  (limit=1000) and the caller's `limit` is applied to what is kept, so one page of the
  caller's objects needs one upstream page unless others own most objects;
  `first_id`/`last_id`/`next_page` are recomputed from what is returned, so no cursor names
  another principal's object. Known limitation: if a whole provider page (1000 objects)
  holds none of the caller's, the reply has no cursor and auto-pagination stops there.
* `results_url` in batch objects points at the provider; it becomes the path alone, so
  clients fetch results through the gateway (the SDK resolves it against its base URL).
* Batch results (JSON Lines) are metered: the usage of succeeded results is summed and
  published in `ccr.usage` on the first fetch only (`metered_at`), so the audit row of
  that fetch carries the batch's tokens and later fetches carry none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from ccr.contract import H_PRINCIPAL_ID, H_REQUEST_ID
from ccr.provider_objects import ObjectKind, ObjectStore
from extauth.endpoints import EndpointMatch, Kind, match
from router.usage import USAGE_FIELDS, Usage

log = logging.getLogger("ccr.adapter.objects")

_Mode = processing_mode_pb2.ProcessingMode
# The whole (small) JSON reply in one message, so it can be rewritten as a whole.
_BUFFER_RESPONSE = _Mode(
    request_header_mode=_Mode.SEND, response_header_mode=_Mode.SEND,
    request_body_mode=_Mode.NONE, response_body_mode=_Mode.BUFFERED,
    request_trailer_mode=_Mode.SKIP, response_trailer_mode=_Mode.SKIP,
)
_REWRITTEN = frozenset({"batches.create", "batches.get", "batches.cancel", "batches.list",
                        "files.upload", "files.list"})
_PREFIXES = ("/v1/messages/batches", "/v1/files")
_LISTS = frozenset({"batches.list", "files.list"})
PROVIDER_MAX_LIMIT = 1000
DEFAULT_LIMIT = 20
MAX_RESULT_LINE = 16 * 1024 * 1024


def object_endpoint(headers: Mapping[str, str]) -> EndpointMatch | None:
    """The Batches/Files endpoint of an upstream request, or None (cheap for everything else)."""
    path = headers.get(":path", "").partition("?")[0]
    if not path.startswith(_PREFIXES):
        return None
    m = match(headers.get(":method", ""), path)
    return m if m is not None and m.endpoint.kind in (Kind.BATCHES, Kind.FILES) else None


def _relative(url: Any) -> Any:
    if not isinstance(url, str) or not url:
        return url
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _fix_batch(obj: Any) -> None:
    if isinstance(obj, dict) and obj.get("type") == "message_batch" and "results_url" in obj:
        obj["results_url"] = _relative(obj["results_url"])


class _ResultsMeter:
    """Sums `usage` of succeeded results in a JSON Lines body, fed in any chunking."""

    def __init__(self) -> None:
        self.usage = Usage()
        self.complete = True
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        start = 0
        while (nl := self._buf.find(b"\n", start)) >= 0:
            self._line(bytes(self._buf[start:nl]))
            start = nl + 1
        del self._buf[:start]
        if len(self._buf) > MAX_RESULT_LINE:
            log.warning("batch result line longer than %d bytes; it is not metered", MAX_RESULT_LINE)
            self.complete = False
            self._buf.clear()

    def finish(self) -> Usage:
        if self._buf.strip():
            self._line(bytes(self._buf))
        self._buf.clear()
        return self.usage

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            self.complete = False
            return
        result = doc.get("result") if isinstance(doc, dict) else None
        if not isinstance(result, dict) or result.get("type") != "succeeded":
            return
        usage = (result.get("message") or {}).get("usage") if isinstance(result.get("message"), dict) else None
        if not isinstance(usage, dict):
            return
        for f in USAGE_FIELDS:
            v = usage.get(f)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                setattr(self.usage, f, getattr(self.usage, f) + v)


class ObjectAttempt:
    """One upstream attempt on a Batches or Files endpoint."""

    def __init__(self, store: ObjectStore, provider: str, m: EndpointMatch, principal_id: str,
                 request_id: str | None = None) -> None:
        self.store = store
        self.provider = provider
        self.m = m
        self.principal_id = principal_id
        # The gateway's x-request-id (Envoy's own, never a client's): a batch create's budget hold.
        self.request_id = request_id
        self.status = 0
        self._meter: _ResultsMeter | None = None
        # Lists: the caller's page size and direction (the provider is asked for its largest page).
        self.limit = DEFAULT_LIMIT
        self.backwards = False

    @classmethod
    def start(cls, store: ObjectStore | None, provider: str, headers: Mapping[str, str]) -> ObjectAttempt | None:
        m = object_endpoint(headers)
        if m is None or store is None:
            return None
        return cls(store, provider, m, headers.get(H_PRINCIPAL_ID, ""), headers.get(H_REQUEST_ID) or None)

    def upstream_path(self, path: str) -> str | None:
        """For lists: the same request with the provider's largest page size, or None to leave it."""
        if self.m.name not in _LISTS:
            return None
        base, _, query = path.partition("?")
        params = parse_qsl(query, keep_blank_values=True)
        limits = [v for k, v in params if k == "limit"]
        if limits:
            if len(limits) > 1 or not limits[0].isdigit() or not 1 <= int(limits[0]) <= PROVIDER_MAX_LIMIT:
                return None  # the provider answers a bad limit with its own error
            self.limit = int(limits[0])
        keys = {k for k, _ in params}
        self.backwards = "before_id" in keys and "after_id" not in keys
        params = [(k, v) for k, v in params if k != "limit"] + [("limit", str(PROVIDER_MAX_LIMIT))]
        return f"{base}?{urlencode(params)}"

    def refuse_early(self) -> str | None:
        """Why this attempt must not be sent (no decided principal to scope it to), or None."""
        if not self.principal_id:
            return (f"the gateway has no principal for this {self.m.name} request; "
                    "the gateway operator must fix the route configuration")
        return None

    async def on_response_headers(self, status: int, end_of_stream: bool, resp: pb.ProcessingResponse,
                                  usage: Callable[[Usage], struct_pb2.Struct]) -> None:
        """Adjust the response-headers reply: buffer replies we rewrite, meter results, note deletes."""
        self.status = status
        if status >= 300 or end_of_stream:
            return
        name = self.m.name
        if name in _REWRITTEN:
            resp.mode_override.CopyFrom(_BUFFER_RESPONSE)
            # The body will change length; Envoy re-frames it.
            resp.response_headers.response.header_mutation.remove_headers.append("content-length")
        elif name == "batches.results":
            # JSON Lines are not a reply the usage meter reads; stream them through us anyway.
            resp.ClearField("mode_override")
            self._meter = _ResultsMeter()
        elif name in ("batches.delete", "files.delete"):
            kind = ObjectKind.BATCH if name.startswith("batches") else ObjectKind.FILE
            oid = self.m.param("batch_id" if kind == ObjectKind.BATCH else "file_id") or ""
            try:
                await self.store.mark_deleted(kind, oid)
            except Exception:
                log.exception("could not mark %s %s deleted", kind, oid)

    def wants_body(self) -> bool:
        return self.status < 300 and (self.m.name in _REWRITTEN or self._meter is not None)

    async def on_body(self, body: pb.HttpBody, resp: pb.ProcessingResponse, usage: Callable[[Usage], struct_pb2.Struct]
                      ) -> pb.ProcessingResponse:
        """The reply to one response_body message (possibly an immediate error instead)."""
        if self._meter is not None:
            self._meter.feed(body.body)
            if body.end_of_stream:
                await self._finish_results(resp, usage)
            return resp
        try:
            doc = orjson.loads(body.body)
            out = await self._rewrite(doc)
        except Exception as e:
            log.exception("%s reply from provider %s could not be processed", self.m.name, self.provider)
            return _error(f"the gateway could not record or scope this {self.m.name} reply ({type(e).__name__}); "
                          "retry, and contact your gateway administrator if it persists")
        resp.response_body.response.body_mutation.body = orjson.dumps(out)
        resp.dynamic_metadata.CopyFrom(usage(Usage()))  # managing objects bills no tokens
        return resp

    async def on_trailers(self, resp: pb.ProcessingResponse, usage: Callable[[Usage], struct_pb2.Struct]) -> None:
        if self._meter is not None:
            await self._finish_results(resp, usage)

    async def _finish_results(self, resp: pb.ProcessingResponse, usage: Callable[[Usage], struct_pb2.Struct]) -> None:
        meter, self._meter = self._meter, None
        if meter is None:
            return
        total = meter.finish()
        if not meter.complete:
            log.warning("results of batch %s were not fully readable; metering what was read", self.m.param("batch_id"))
        first = await self.store.mark_metered(self.m.param("batch_id") or "")
        resp.dynamic_metadata.CopyFrom(usage(total if first else Usage()))

    async def _rewrite(self, doc: Any) -> Any:
        name = self.m.name
        if not isinstance(doc, dict):
            raise ValueError("reply is not a JSON object")
        if name == "batches.create":
            counts = doc.get("request_counts") or {}
            n = sum(v for v in counts.values() if isinstance(v, int)) if isinstance(counts, dict) else None
            await self.store.record(ObjectKind.BATCH, str(doc["id"]), self.provider, self.principal_id, n,
                                    self.request_id)
        elif name == "files.upload":
            await self.store.record(ObjectKind.FILE, str(doc["id"]), self.provider, self.principal_id)
        elif name in ("batches.list", "files.list"):
            kind = ObjectKind.BATCH if name == "batches.list" else ObjectKind.FILE
            data = [o for o in doc.get("data") or () if isinstance(o, dict)]
            mine = await self.store.owned_among(kind, [str(o.get("id")) for o in data], self.principal_id)
            kept = [o for o in data if o.get("id") in mine]
            more = len(kept) > self.limit
            # Newest first; going backwards (before_id) the page is the part nearest the cursor.
            kept = kept[-self.limit:] if self.backwards else kept[:self.limit]
            for o in kept:
                _fix_batch(o)
            doc["data"] = kept
            doc["has_more"] = bool(more or doc.get("has_more"))
            doc["first_id"] = kept[0]["id"] if kept else None
            doc["last_id"] = kept[-1]["id"] if kept else None
            if "next_page" in doc:
                doc["next_page"] = kept[-1]["id"] if kept and doc.get("has_more") else None
            return doc
        _fix_batch(doc)
        return doc


def _error(message: str) -> pb.ProcessingResponse:
    from router.adapter.server import error_response  # the one Anthropic-shaped local reply

    return error_response(500, "api_error", message, "ccr_adapter_object_record_failed")
