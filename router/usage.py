"""Token usage read from provider responses (Anthropic Messages API, JSON or SSE).

Pure and incremental: a meter is fed the response body chunk by chunk exactly as
Envoy streams it, never changes a byte, and never raises on malformed input; it
records what it could read and says whether the response was complete.

`assess` turns what was read into what the audit row says (ccr.contract.UsageStatus):
the provider's own counts when they arrived; when a stream ends before its final
usage (client abort, upstream reset, error event), the output produced so far is
estimated from the streamed deltas (see OutputEstimate); what cannot be read is
unknown (no counts), never 0.
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from ccr.contract import (
    USAGE_CACHE_SPLIT,
    USAGE_CACHE_SPLIT_SOURCE,
    USAGE_TOKEN_FIELDS,
    UsageStatus,
)

log = logging.getLogger(__name__)

# A JSON reply or one SSE line larger than this is not a Messages API reply we
# can meter; stop buffering instead of holding unbounded memory per stream.
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_SSE_LINE_BYTES = 16 * 1024 * 1024

USAGE_FIELDS = USAGE_TOKEN_FIELDS

# Output estimate for a stream whose final usage never arrived: about four bytes of
# UTF-8 per token (Anthropic's rule of thumb of ~4 characters per English token;
# for CJK text, 3 bytes per character gives ~0.75 tokens per character, near the real
# rate). A non-empty delta always carries at least one token, so the estimate is never
# below the number of such deltas.
BYTES_PER_TOKEN = 4


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # cache_creation_input_tokens split by cache lifetime (usage.cache_creation), for pricing.
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """The four counts, plus the cache-write split when the provider gave one (publishers
        default it to 0: router/adapter/server.py usage_struct)."""
        d = {f: getattr(self, f) for f in USAGE_FIELDS}
        if self.cache_creation_5m_input_tokens or self.cache_creation_1h_input_tokens:
            for f in USAGE_CACHE_SPLIT:
                d[f] = getattr(self, f)
        return d

    def update(self, usage: object, fields: tuple[str, ...] = USAGE_FIELDS) -> bool:
        """Take the integer counters present in an Anthropic `usage` object; True if any changed."""
        if not isinstance(usage, dict):
            return False
        changed = False
        for f in fields:
            v = usage.get(f)
            # bool is an int subclass; a null or missing counter keeps the known value.
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and getattr(self, f) != v:
                setattr(self, f, v)
                changed = True
        split = usage.get("cache_creation")
        if isinstance(split, dict):
            for f, src in zip(USAGE_CACHE_SPLIT, USAGE_CACHE_SPLIT_SOURCE, strict=True):
                v = split.get(src)
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and getattr(self, f) != v:
                    setattr(self, f, v)
                    changed = True
        return changed


@dataclass
class OutputEstimate:
    """Output produced by a stream so far, counted from its content deltas."""

    utf8_bytes: int = 0
    deltas: int = 0  # non-empty text / thinking / tool-input deltas

    def add(self, text: str) -> bool:
        if not text:
            return False
        self.utf8_bytes += len(text.encode("utf-8", "surrogatepass"))
        self.deltas += 1
        return True

    def tokens(self) -> int:
        return max(-(-self.utf8_bytes // BYTES_PER_TOKEN), self.deltas)


@dataclass
class MeterResult:
    usage: Usage = field(default_factory=Usage)
    # The response carried billable usage (a Message); count_tokens replies and
    # unparseable bodies do not.
    billable: bool = False
    # The whole reply was seen (JSON parsed, or SSE message_stop).
    complete: bool = False
    # Error type from an SSE `error` event or an error JSON body, if any.
    error: str | None = None
    # Streams: message_start carried usage (input and cache counts are the provider's).
    started: bool = False
    # Streams: a message_delta carried the provider's cumulative output count.
    final: bool = False
    # Streams: output counted from the deltas, for when `final` never comes.
    estimate: OutputEstimate = field(default_factory=OutputEstimate)
    # Why the body could not be read, when it could not.
    problem: str | None = None


@dataclass(frozen=True)
class Assessment:
    """What the audit row says about one reply's usage."""

    status: UsageStatus
    usage: dict[str, int] | None  # None: the counts are unknown (NULL)
    note: str = ""


def not_billable(note: str) -> Assessment:
    return Assessment(UsageStatus.NOT_BILLABLE, Usage().as_dict(), note)


def unknown(note: str) -> Assessment:
    return Assessment(UsageStatus.UNKNOWN, None, note)


def assess(r: MeterResult, streaming: bool, ended: bool) -> Assessment:
    """The status and counts for a reply; `ended` False means "if nothing more arrives".

    Mid-stream assessments are published too: when a client aborts, Envoy ends the
    attempt without telling the adapter, and the last one published is what is logged.
    """
    cut = "the reply ended" if ended else "the reply did not finish"
    if r.problem:
        return unknown(r.problem)
    if not streaming:
        if not r.complete:
            return unknown(f"{cut} before its JSON body was complete; usage unreadable")
        if r.billable:
            return Assessment(UsageStatus.COMPLETE, r.usage.as_dict())
        if r.error:
            return not_billable(f"provider error body ({r.error}) carries no usage")
        return not_billable("reply is not a Message and bills no tokens (e.g. count_tokens)")
    if r.final:
        if r.complete:
            return Assessment(UsageStatus.COMPLETE, r.usage.as_dict())
        why = f"provider error event {r.error}" if r.error else "no message_stop"
        return Assessment(UsageStatus.PARTIAL, r.usage.as_dict(),
                          f"{cut} before it was complete ({why}); the provider's last cumulative count is used")
    if r.started:
        counts = r.usage.as_dict()
        est = r.estimate
        counts["output_tokens"] = max(r.usage.output_tokens, est.tokens())
        why = f"provider error event {r.error}" if r.error else "cut off"
        return Assessment(UsageStatus.ESTIMATED, counts, (
            f"{cut} before its final usage ({why}); input and cache counts are the provider's, output "
            f"estimated from {est.deltas} streamed deltas ({est.utf8_bytes} UTF-8 bytes, "
            f"{BYTES_PER_TOKEN} bytes per token)"))
    if r.complete:
        return unknown("stream carried no usage")
    if r.error:
        return unknown(f"stream ended with provider error event {r.error} before message_start")
    return unknown(f"{cut} before message_start; no usage read")


class UsageMeter(Protocol):
    result: MeterResult

    def feed(self, chunk: bytes) -> bool:
        """Consume one body chunk; True if the known usage changed."""
        ...

    def finish(self) -> MeterResult:
        """The body ended; return what was read."""
        ...


class JsonUsageMeter:
    """A non-streaming reply: buffer, parse once at the end."""

    def __init__(self) -> None:
        self.result = MeterResult()
        self._buf = bytearray()
        self._overflow = False

    def feed(self, chunk: bytes) -> bool:
        if not self._overflow:
            if len(self._buf) + len(chunk) > MAX_JSON_BYTES:
                self._overflow = True
                self._buf = bytearray()
                self.result.problem = f"JSON reply larger than {MAX_JSON_BYTES} bytes; usage not metered"
                log.warning("%s", self.result.problem)
            else:
                self._buf += chunk
        return False

    def finish(self) -> MeterResult:
        if self._overflow or self.result.complete or self.result.problem:
            return self.result
        try:
            doc = orjson.loads(self._buf)
        except orjson.JSONDecodeError as e:
            log.warning("reply body is not valid JSON (%s); usage not metered", e)
            self.result.problem = "reply body is not valid JSON; usage unreadable"
            return self.result
        finally:
            self._buf = bytearray()
        self.result.complete = True
        if not isinstance(doc, dict):
            return self.result
        # Only a Message bills tokens; {"input_tokens": N} from count_tokens does not.
        if doc.get("type") == "message":
            self.result.usage.update(doc.get("usage"))
            self.result.billable = isinstance(doc.get("usage"), dict)
        elif doc.get("type") == "error" and isinstance(doc.get("error"), dict):
            self.result.error = str(doc["error"].get("type") or "error")
        return self.result


_EOL = re.compile(rb"\r\n|\r|\n")
# Events that can carry usage, output to estimate, or end the stream; ping and
# block start/stop events are never JSON-decoded.
_USEFUL_EVENTS = frozenset({b"message_start", b"message_delta", b"message_stop", b"error",
                            b"content_block_delta"})
# The streamed output of each delta type (signatures and citations bill no output of their own).
_DELTA_TEXT = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


class SseUsageMeter:
    """A streaming reply: an incremental SSE parser, robust to any chunking and to CRLF/CR/LF."""

    def __init__(self) -> None:
        self.result = MeterResult()
        self._buf = bytearray()
        self._event = b""
        self._data: list[bytes] = []
        self._skip_line = False

    def feed(self, chunk: bytes) -> bool:
        self._buf += chunk
        return self._drain(final=False)

    def finish(self) -> MeterResult:
        self._drain(final=True)
        if self._buf and not self._skip_line:
            self._line(bytes(self._buf))
        self._buf = bytearray()
        # A stream cut off without its blank line still dispatches what it had.
        self._dispatch()
        return self.result

    def _drain(self, final: bool) -> bool:
        changed = False
        pos = 0
        buf = self._buf
        while True:
            m = _EOL.search(buf, pos)
            if m is None:
                break
            # A CR at the very end may be the first half of a CRLF split across chunks.
            if m.group() == b"\r" and m.end() == len(buf) and not final:
                break
            if self._skip_line:
                self._skip_line = False
            else:
                changed |= self._line(bytes(buf[pos:m.start()]))
            pos = m.end()
        if pos:
            del buf[:pos]
        if len(buf) > MAX_SSE_LINE_BYTES and not self._skip_line:
            log.warning("SSE line longer than %d bytes; skipping it", MAX_SSE_LINE_BYTES)
            self._skip_line = True
        if self._skip_line:
            buf.clear()
        return changed

    def _line(self, line: bytes) -> bool:
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return False  # comment / keep-alive
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            self._event = value
        elif name == b"data":
            self._data.append(value)
        return False

    def _dispatch(self) -> bool:
        event, data = self._event, self._data
        self._event, self._data = b"", []
        if not data:
            return False
        if event and event not in _USEFUL_EVENTS:
            return False
        payload = b"\n".join(data)
        if not event and b'"message_' not in payload and b'"error"' not in payload \
                and b'"content_block_delta"' not in payload:
            return False
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.warning("SSE %s event data is not valid JSON; skipped", event.decode(errors="replace"))
            return False
        if not isinstance(doc, dict):
            return False
        kind = doc.get("type") or event.decode(errors="replace")
        usage = self.result.usage
        if kind == "content_block_delta":
            delta = doc.get("delta")
            if not isinstance(delta, dict):
                return False
            text = delta.get(_DELTA_TEXT.get(str(delta.get("type")), ""))
            return self.result.estimate.add(text) if isinstance(text, str) else False
        if kind == "message_start":
            msg = doc.get("message")
            u = msg.get("usage") if isinstance(msg, dict) else None
            if isinstance(u, dict):
                self.result.billable = True
                changed = not self.result.started
                self.result.started = True
                return usage.update(u) or changed
            return False
        if kind == "message_delta":
            u = doc.get("usage")
            if isinstance(u, dict):
                self.result.billable = True
                changed = not self.result.final
                # output_tokens is cumulative; input/cache counts, when present, are final.
                self.result.final = isinstance(u.get("output_tokens"), int)
                return usage.update(u) or changed
            return False
        if kind == "message_stop":
            self.result.complete = True
        elif kind == "error":
            err = doc.get("error")
            self.result.error = str(err.get("type") or "error") if isinstance(err, dict) else "error"
            log.info("provider stream ended with an error event: %s", self.result.error)
        return False


class DecodingMeter:
    """Undo a gzip/deflate content-encoding for the meter only; the client still gets the bytes as sent."""

    def __init__(self, inner: UsageMeter) -> None:
        self._inner = inner
        self.result = inner.result
        # 32 + MAX_WBITS: accept both gzip and zlib headers.
        self._z: zlib._Decompress | None = zlib.decompressobj(32 + zlib.MAX_WBITS)

    def feed(self, chunk: bytes) -> bool:
        if self._z is None:
            return False
        try:
            out = self._z.decompress(chunk)
        except zlib.error as e:
            log.warning("compressed reply cannot be decoded (%s); metering stops", e)
            self.result.problem = "compressed reply could not be decoded; usage unreadable"
            self._z = None
            return False
        return self._inner.feed(out) if out else False

    def finish(self) -> MeterResult:
        if self._z is not None:
            try:
                tail = self._z.flush()
                if tail:
                    self._inner.feed(tail)
            except zlib.error as e:
                log.warning("compressed reply truncated (%s)", e)
        return self._inner.finish()


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def content_codings(content_encoding: str) -> list[str]:
    return [c.strip().lower() for c in content_encoding.split(",") if c.strip() and c.strip() != "identity"]


def meterable(content_type: str) -> bool:
    return media_type(content_type) in ("application/json", "text/event-stream")


def decodable(content_encoding: str) -> bool:
    codings = content_codings(content_encoding)
    return not codings or (len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"))


def make_meter(content_type: str, content_encoding: str = "") -> UsageMeter | None:
    """A meter for a reply of this type and coding, or None when it cannot carry or be read for usage."""
    mt = media_type(content_type)
    if mt == "text/event-stream":
        meter: UsageMeter = SseUsageMeter()
    elif mt == "application/json":
        meter = JsonUsageMeter()
    else:
        return None
    if not decodable(content_encoding):
        return None
    return DecodingMeter(meter) if content_codings(content_encoding) else meter


def meter_bytes(content_type: str, body: bytes, content_encoding: str = "") -> MeterResult:
    """Meter a whole body at once (tests, offline re-metering)."""
    meter = make_meter(content_type, content_encoding)
    if meter is None:
        return MeterResult()
    meter.feed(body)
    return meter.finish()
