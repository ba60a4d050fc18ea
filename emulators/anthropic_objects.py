"""Message Batches and Files for the Anthropic emulator: objects that live at the provider.

Same wire shapes as the real API: `message_batch` objects (`msgbatch_...`) with
`processing_status`, `request_counts` and `results_url`; results as JSON Lines of
`{custom_id, result}`; `file` objects (`file_...`) from a multipart upload, listed,
described, downloaded and deleted. The Files endpoints (and Messages requests that
reference a file) need the `anthropic-beta: files-api-2025-04-14` header, as on the
real API while Files was in beta.

Batches never depend on timing: by default a batch is processed at create time and
reads back as `ended`; with `batch_mode="manual"` it stays `in_progress` until a test
calls `POST /_emulator/batches/{id}/end` (or `/_emulator/batches/end` for all).
Simplification: uploaded files are downloadable (the real API only serves the content
of files that tools created); it keeps the content endpoint testable.
"""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesParser
from email.policy import HTTP
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from emulators.anthropic import (
    BadRequest,
    _rand_id,
    error_response,
    generate,
    scan_prompt,
    validate_messages,
)

if TYPE_CHECKING:
    from emulators.anthropic import Emulator

FILES_BETA = "files-api-2025-04-14"
CUSTOM_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_BATCH_REQUESTS = 100_000
# The real API keeps results for 29 days and expires unfinished batches after 24 hours.
BATCH_EXPIRY = timedelta(hours=24)


def _ts(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat().replace("+00:00", "Z")


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def file_ids_in(params: Any) -> list[str]:
    """file_ids referenced by `source: {type: file, file_id}` blocks in messages and system."""
    out: list[str] = []

    def walk(blocks: Any) -> None:
        if not isinstance(blocks, list):
            return
        for b in blocks:
            if not isinstance(b, dict):
                continue
            src = b.get("source")
            if isinstance(src, dict) and src.get("type") == "file":
                out.append(str(src.get("file_id")))
            walk(b.get("content"))  # tool_result blocks nest content

    if isinstance(params, dict):
        walk(params.get("system"))
        for m in params.get("messages") or ():
            if isinstance(m, dict):
                walk(m.get("content"))
    return out


@dataclass
class Batch:
    id: str
    created_at: datetime
    requests: list[tuple[str, dict[str, Any]]]
    ended_at: datetime | None = None
    cancel_initiated_at: datetime | None = None
    # custom_id -> result object, filled when the batch ends.
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at else "in_progress"

    def obj(self, base: str) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if self.ended_at is None:
            counts["processing"] = len(self.requests)
        else:
            for r in self.results.values():
                counts[r["type"]] += 1
        return {
            "id": self.id, "type": "message_batch", "processing_status": self.status,
            "request_counts": counts, "ended_at": _ts(self.ended_at), "created_at": _ts(self.created_at),
            "expires_at": _ts(self.created_at + BATCH_EXPIRY), "archived_at": None,
            "cancel_initiated_at": _ts(self.cancel_initiated_at),
            "results_url": f"{base}/v1/messages/batches/{self.id}/results" if self.ended_at else None,
        }


@dataclass
class StoredFile:
    id: str
    created_at: datetime
    filename: str
    mime_type: str
    content: bytes

    def obj(self) -> dict[str, Any]:
        return {"id": self.id, "type": "file", "filename": self.filename, "mime_type": self.mime_type,
                "size_bytes": len(self.content), "created_at": _ts(self.created_at), "downloadable": True}


def _page(ids: list[str], query: Any, cursor_param: str | None = None) -> tuple[list[str], bool] | web.Response:
    """One page of `ids` (newest first) by limit / after_id / before_id, as the real API pages."""
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 1000:
        return error_response(400, "invalid_request_error", "limit: Input should be between 1 and 1000")
    after = query.get("after_id") or (query.get(cursor_param) if cursor_param else None)
    before = query.get("before_id")
    lo, hi = 0, len(ids)
    if after:
        lo = ids.index(after) + 1 if after in ids else len(ids)
    if before:
        hi = ids.index(before) if before in ids else 0
    page = ids[lo:hi]
    if before and not after:
        return page[-limit:], len(page) > limit
    return page[:limit], len(page) > limit


class ObjectEndpoints:
    """The Batches and Files endpoints, state kept in memory per emulator process."""

    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator
        self.batches: dict[str, Batch] = {}
        self.files: dict[str, StoredFile] = {}

    def register(self, r: web.UrlDispatcher) -> None:
        r.add_post("/v1/messages/batches", self.create_batch)
        r.add_get("/v1/messages/batches", self.list_batches)
        r.add_get("/v1/messages/batches/{id}", self.get_batch)
        r.add_delete("/v1/messages/batches/{id}", self.delete_batch)
        r.add_post("/v1/messages/batches/{id}/cancel", self.cancel_batch)
        r.add_get("/v1/messages/batches/{id}/results", self.batch_results)
        r.add_post("/v1/files", self.upload_file)
        r.add_get("/v1/files", self.list_files)
        r.add_get("/v1/files/{id}", self.get_file)
        r.add_delete("/v1/files/{id}", self.delete_file)
        r.add_get("/v1/files/{id}/content", self.file_content)
        r.add_post("/_emulator/batches/end", self.end_all)
        r.add_post("/_emulator/batches/{id}/end", self.end_one)

    @staticmethod
    def _base(request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    # -- batches

    def _process(self, params: dict[str, Any]) -> dict[str, Any]:
        """One request of a batch, as the Messages endpoint would answer it."""
        try:
            validate_messages(params)
            if params.get("stream"):
                raise BadRequest("stream: streaming is not supported in Message Batches")
            for fid in file_ids_in(params):
                if fid not in self.files:
                    raise BadRequest(f"File not found: {fid}")
        except BadRequest as e:
            return {"type": "errored", "error": {"type": "error", "error": {
                "type": "invalid_request_error", "message": str(e)}, "request_id": _rand_id("req_011C", 20)}}
        usage = self.emu.cache.apply(scan_prompt(params))
        reply = generate(params, self.emu.config.output_tokens)
        message = {
            "id": _rand_id("msg_01", 22), "type": "message", "role": "assistant", "model": params["model"],
            "content": reply.blocks, "stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence,
            "usage": {**usage, "output_tokens": reply.output_tokens, "service_tier": "batch"},
        }
        return {"type": "succeeded", "message": message}

    def _end(self, b: Batch) -> None:
        if b.ended_at is not None:
            return
        for cid, params in b.requests:
            b.results[cid] = {"type": "canceled"} if b.cancel_initiated_at else self._process(params)
        b.ended_at = datetime.now(UTC)

    def _parse_batch(self, body: Any) -> list[tuple[str, dict[str, Any]]]:
        if not isinstance(body, dict):
            raise BadRequest("body: Input should be a valid dictionary")
        reqs = body.get("requests")
        if reqs is None:
            raise BadRequest("requests: Field required")
        if not isinstance(reqs, list) or not reqs:
            raise BadRequest("requests: List should have at least 1 item")
        if len(reqs) > MAX_BATCH_REQUESTS:
            raise BadRequest(f"requests: List should have at most {MAX_BATCH_REQUESTS} items")
        out: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        for i, r in enumerate(reqs):
            if not isinstance(r, dict):
                raise BadRequest(f"requests.{i}: Input should be a valid dictionary")
            cid = r.get("custom_id")
            if not isinstance(cid, str) or not CUSTOM_ID_RE.fullmatch(cid):
                raise BadRequest(f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
            if cid in seen:
                raise BadRequest(f"requests.{i}.custom_id: custom_id '{cid}' is not unique within the batch")
            seen.add(cid)
            params = r.get("params")
            if not isinstance(params, dict):
                raise BadRequest(f"requests.{i}.params: Field required")
            out.append((cid, params))
        return out

    async def create_batch(self, request: web.Request) -> web.StreamResponse:
        denied = await self.emu._gate(request)
        if denied is not None:
            return denied
        try:
            reqs = self._parse_batch(await self.emu._json(request))
        except BadRequest as e:
            return error_response(400, "invalid_request_error", str(e))
        b = Batch(_rand_id("msgbatch_01", 22), datetime.now(UTC), reqs)
        self.batches[b.id] = b
        if self.emu.config.batch_mode == "immediate":
            self._end(b)
        return _json(b.obj(self._base(request)))

    def _batch(self, request: web.Request) -> Batch | web.Response:
        bid = request.match_info["id"]
        b = self.batches.get(bid)
        if b is None:
            return error_response(404, "not_found_error", f"message_batch: {bid} not found")
        return b

    async def _gated_batch(self, request: web.Request) -> Batch | web.Response:
        """The batch a request names, once the request has passed the emulator's gate."""
        denied = await self.emu._gate(request)
        return denied if denied is not None else self._batch(request)

    async def get_batch(self, request: web.Request) -> web.StreamResponse:
        b = await self._gated_batch(request)
        return b if isinstance(b, web.Response) else _json(b.obj(self._base(request)))

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        denied = await self.emu._gate(request)
        if denied is not None:
            return denied
        ids = sorted(self.batches, key=lambda k: self.batches[k].created_at, reverse=True)
        page = _page(ids, request.query)
        if isinstance(page, web.Response):
            return page
        chosen, has_more = page
        base = self._base(request)
        data = [self.batches[i].obj(base) for i in chosen]
        return _json({"data": data, "has_more": has_more, "first_id": chosen[0] if chosen else None,
                      "last_id": chosen[-1] if chosen else None})

    async def cancel_batch(self, request: web.Request) -> web.StreamResponse:
        b = await self._gated_batch(request)
        if isinstance(b, web.Response):
            return b
        if b.ended_at is not None:
            return error_response(400, "invalid_request_error",
                                  f"message_batch: {b.id} has already ended and cannot be canceled")
        if b.cancel_initiated_at is None:
            b.cancel_initiated_at = datetime.now(UTC)
        reply = b.obj(self._base(request))  # "canceling", as the real API answers
        if self.emu.config.batch_mode == "immediate":
            self._end(b)
        return _json(reply)

    async def delete_batch(self, request: web.Request) -> web.StreamResponse:
        b = await self._gated_batch(request)
        if isinstance(b, web.Response):
            return b
        if b.ended_at is None:
            return error_response(400, "invalid_request_error",
                                  f"message_batch: {b.id} is still processing; cancel it before deleting it")
        del self.batches[b.id]
        return _json({"id": b.id, "type": "message_batch_deleted"})

    async def batch_results(self, request: web.Request) -> web.StreamResponse:
        b = await self._gated_batch(request)
        if isinstance(b, web.Response):
            return b
        if b.ended_at is None:
            return error_response(400, "invalid_request_error",
                                  f"message_batch: {b.id} has not ended; results are available once it has")
        lines = b"".join(orjson.dumps({"custom_id": cid, "result": b.results[cid]}) + b"\n" for cid, _ in b.requests)
        return web.Response(body=lines, content_type="application/binary")

    async def end_all(self, request: web.Request) -> web.Response:
        for b in list(self.batches.values()):
            self._end(b)
        return _json({"ended": len(self.batches)})

    async def end_one(self, request: web.Request) -> web.Response:
        b = self._batch(request)
        if isinstance(b, web.Response):
            return b
        self._end(b)
        return _json({"ended": 1})

    # -- files

    async def _files_gate(self, request: web.Request) -> web.Response | None:
        denied = await self.emu._gate(request)
        if denied is not None:
            return denied
        return require_files_beta(request)

    def _file(self, request: web.Request) -> StoredFile | web.Response:
        fid = request.match_info["id"]
        f = self.files.get(fid)
        if f is None:
            return error_response(404, "not_found_error", f"File not found: {fid}")
        return f

    async def _gated_file(self, request: web.Request) -> StoredFile | web.Response:
        """The file a request names, once the request has passed the Files gate."""
        denied = await self._files_gate(request)
        return denied if denied is not None else self._file(request)

    async def upload_file(self, request: web.Request) -> web.StreamResponse:
        denied = await self._files_gate(request)
        if denied is not None:
            return denied
        if not request.content_type.startswith("multipart/"):
            return error_response(400, "invalid_request_error",
                                  "Content-Type: the file must be sent as multipart/form-data with a 'file' part")
        part = _file_part(request.headers["content-type"], await request.read())
        if part is None:
            return error_response(400, "invalid_request_error", "file: Field required")
        name, mime, content = part
        name = name.rsplit("/", 1)[-1]
        if not mime or mime == "application/octet-stream":
            mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        f = StoredFile(_rand_id("file_011C", 22), datetime.now(UTC), name, mime, content)
        self.files[f.id] = f
        return _json(f.obj())

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        denied = await self._files_gate(request)
        if denied is not None:
            return denied
        ids = sorted(self.files, key=lambda k: self.files[k].created_at, reverse=True)
        page = _page(ids, request.query, cursor_param="page")
        if isinstance(page, web.Response):
            return page
        chosen, has_more = page
        last = chosen[-1] if chosen else None
        return _json({"data": [self.files[i].obj() for i in chosen], "has_more": has_more,
                      "first_id": chosen[0] if chosen else None, "last_id": last,
                      "next_page": last if has_more else None})

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        f = await self._gated_file(request)
        return f if isinstance(f, web.Response) else _json(f.obj())

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        f = await self._gated_file(request)
        if isinstance(f, web.Response):
            return f
        return web.Response(body=f.content, content_type=f.mime_type,
                            headers={"content-disposition": f'attachment; filename="{f.filename}"'})

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        f = await self._gated_file(request)
        if isinstance(f, web.Response):
            return f
        del self.files[f.id]
        return _json({"id": f.id, "type": "file_deleted"})

    def check_message_files(self, request: web.Request, body: dict[str, Any]) -> web.Response | None:
        """A Messages request may name uploaded files: beta header needed, and the files must exist."""
        ids = file_ids_in(body)
        if not ids:
            return None
        denied = require_files_beta(request)
        if denied is not None:
            return denied
        for fid in ids:
            if fid not in self.files:
                return error_response(404, "not_found_error", f"File not found: {fid}")
        return None


def _file_part(content_type: str, body: bytes) -> tuple[str, str, bytes] | None:
    """(filename, content type, bytes) of the multipart part named 'file'.

    The body was already read (every request is recorded), so it is parsed from bytes.
    """
    msg = BytesParser(policy=HTTP).parsebytes(b"content-type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        return None
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") != "file":
            continue
        payload = part.get_payload(decode=True)
        return part.get_filename() or "upload", part.get_content_type(), payload if isinstance(payload, bytes) else b""
    return None


def require_files_beta(request: web.Request) -> web.Response | None:
    betas = {b.strip() for h in request.headers.getall("anthropic-beta", []) for b in h.split(",")}
    if FILES_BETA in betas:
        return None
    return error_response(400, "invalid_request_error",
                          f"The Files API is in beta; send the header 'anthropic-beta: {FILES_BETA}'")
