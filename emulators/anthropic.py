"""Anthropic Messages API emulator: the upstream `ccr up` uses without provider credentials.

It speaks the real wire format (auth and version headers, validation errors, Message
objects, the SSE event sequence, prompt-cache usage fields), so the gateway, its tests and
its benchmarks exercise the same paths they would against api.anthropic.com. Faults and
latency can be switched on per process (CLI) or per request (`x-emulator-*` headers; a reply can be made to
carry any header with `x-emulator-response-header: NAME=VALUE`), and
every request is recorded (headers, body length and sha256) for tests at /_emulator/requests.
Records carry a sequence number that only grows, so a test can read exactly what arrived after
a mark even once the ring of kept records has dropped old ones (see `get_records`).

Mid-stream faults strike after half of the first content block; with `x-emulator-hold: NAME`
they wait there until `POST /_emulator/release/NAME`, so a test can see output before the fault.
Replies are compressed (br, gzip) when the request's Accept-Encoding asks, as a real API does.
Message Batches and Files live in emulators/anthropic_objects.py.

Run: python -m emulators.anthropic --port 0 --api-key KEY --ready-file F
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import random
import re
import secrets
import signal
import string
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

try:  # br is what a real API (behind a CDN) prefers when a client offers it
    import brotli
except ImportError:  # pragma: no cover - gzip still works
    brotli = None

log = logging.getLogger("ccr.emulator")

API_KEY_ENV = "CCR_EMULATOR_API_KEY"
# Any dated version: the SDK in use sends newer ones (2026-10-21) than the original 2023-06-01.
API_VERSION_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
THINKING_TYPES = ("enabled", "disabled", "adaptive", "between_tools")
FAULTS = ("429", "529", "500", "reset", "midstream-reset", "midstream-error")
# Bodies of 20 MB and more must pass; aiohttp's 1 MB default would reject them.
DEFAULT_MAX_BODY = 600 * 1024 * 1024
# Tokens per text delta event, roughly what the real API sends.
TOKENS_PER_DELTA = 3
# Characters per estimated token for text; base64 media is far denser per token.
CHARS_PER_TOKEN = 4
MEDIA_CHARS_PER_TOKEN = 256
# The real API looks back this many blocks from a breakpoint for an earlier cache hit.
CACHE_LOOKBACK = 20
CACHE_TTL = {"5m": 300.0, "1h": 3600.0}
CACHE_MAX_ENTRIES = 100_000

RID_KEY = web.RequestKey("request_id", str)
FAULT_KEY = web.RequestKey("fault", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_ALNUM = string.ascii_letters + string.digits

# (id, display name, created_at, lifecycle), newest first like the real list. Dates of the
# undated ids the SDK names are placeholders that only keep the list ordered.
MODELS: tuple[tuple[str, str, str, str], ...] = (
    ("claude-opus-5", "Claude Opus 5", "2026-09-01T00:00:00Z", "active"),
    ("claude-sonnet-5", "Claude Sonnet 5", "2026-09-01T00:00:00Z", "active"),
    ("claude-opus-4-8", "Claude Opus 4.8", "2026-07-01T00:00:00Z", "active"),
    ("claude-opus-4-7", "Claude Opus 4.7", "2026-05-01T00:00:00Z", "active"),
    ("claude-opus-4-6", "Claude Opus 4.6", "2026-02-01T00:00:00Z", "active"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-01T00:00:00Z", "active"),
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z", "deprecated"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z", "active"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z", "deprecated"),
)
_MODEL_BY_ID = {m[0]: m for m in MODELS}
# Undated aliases ("claude-sonnet-4-5") resolve to the dated model, as on the real API.
_MODEL_BY_ID.update({m[0].rsplit("-", 1)[0]: m for m in MODELS if m[0][-8:].isdigit()})

# Largest max_tokens each model accepts (its output limit); the API refuses more with a 400 naming
# the limit. Ids not listed (test models) are not limited here.
MAX_OUTPUT_TOKENS: dict[str, int] = {
    "claude-opus-5": 128_000, "claude-sonnet-5": 128_000, "claude-opus-4-8": 128_000, "claude-opus-4-7": 128_000,
    "claude-opus-4-6": 128_000, "claude-sonnet-4-6": 64_000, "claude-opus-4-5-20251101": 64_000,
    "claude-haiku-4-5-20251001": 64_000, "claude-sonnet-4-5-20250929": 64_000,
}


def output_limit(model: str) -> tuple[str, int] | None:
    """(the model's full id, its output token limit), or None for a model without one here."""
    m = _MODEL_BY_ID.get(model)
    if m is None or m[0] not in MAX_OUTPUT_TOKENS:
        return None
    return m[0], MAX_OUTPUT_TOKENS[m[0]]


_FILLER_TEXT = ("the emulator streams deterministic text so that gateway tests and benchmarks can "
                "check token accounting caching and streaming without calling a real model")
_FILLER = tuple(_FILLER_TEXT.split())


def _rand_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(n))


class BadRequest(Exception):
    """A request the real API would reject with 400 invalid_request_error."""


# ---------------------------------------------------------------------------- tokens


@dataclass
class Prompt:
    """Token estimate of a request's prompt, with per-block prefix fingerprints for caching."""

    total: int
    # Tokens up to and including block i, and the fingerprint of that prefix.
    upto: list[int]
    digests: list[bytes]
    # (block index, ttl) of each cache_control breakpoint, in prompt order.
    breakpoints: list[tuple[int, str]]


class _PromptScanner:
    """Walks tools -> system -> messages once: counts characters and fingerprints prefixes.

    Long strings are fingerprinted by length and a few sampled windows, so the cost is
    proportional to the number of JSON nodes, not to the body size.
    """

    def __init__(self, model: str) -> None:
        self.chars = 0
        self.media_chars = 0
        self.hasher = hashlib.blake2b(model.encode(), digest_size=16)
        self.upto: list[int] = []
        self.digests: list[bytes] = []
        self.breakpoints: list[tuple[int, str]] = []

    def tokens(self) -> int:
        return -(-self.chars // CHARS_PER_TOKEN) + -(-self.media_chars // MEDIA_CHARS_PER_TOKEN)

    def _string(self, s: str, media: bool = False) -> None:
        n = len(s)
        if media:
            self.media_chars += n
        else:
            self.chars += n
        h = self.hasher
        h.update(n.to_bytes(8, "little"))
        if n <= 1024:
            h.update(s.encode("utf-8", "surrogatepass"))
            return
        step = n // 16
        for i in range(16):
            h.update(s[i * step : i * step + 32].encode("utf-8", "surrogatepass"))
        h.update(s[-32:].encode("utf-8", "surrogatepass"))

    def _value(self, v: Any, key: str = "") -> None:
        if isinstance(v, str):
            self._string(v, media=key == "data")
        elif isinstance(v, dict):
            for k, sub in v.items():
                if k == "cache_control":
                    continue  # moving a breakpoint must not change the prefix it marks
                self.hasher.update(k.encode())
                self._value(sub, k)
        elif isinstance(v, list):
            for sub in v:
                self._value(sub, key)
        elif v is not None:
            self._string(str(v))

    def block(self, b: Any, overhead: int = 4) -> None:
        self.chars += overhead
        self._value(b)
        self.upto.append(self.tokens())
        self.digests.append(self.hasher.copy().digest())
        cc = b.get("cache_control") if isinstance(b, dict) else None
        if isinstance(cc, dict):
            ttl = cc.get("ttl", "5m")
            self.breakpoints.append((len(self.upto) - 1, ttl if ttl in CACHE_TTL else "5m"))


def scan_prompt(body: dict[str, Any]) -> Prompt:
    s = _PromptScanner(str(body.get("model", "")))
    for tool in body.get("tools") or ():
        s.block(tool, overhead=16)
    system = body.get("system")
    if isinstance(system, str):
        if system:
            s.block(system)
    elif isinstance(system, list):
        for b in system:
            s.block(b)
    for m in body.get("messages") or ():
        content = m.get("content")
        s.chars += 12  # role markers
        s.hasher.update(str(m.get("role")).encode())
        if isinstance(content, str):
            s.block(content)
        elif isinstance(content, list):
            for b in content:
                s.block(b)
    return Prompt(max(1, s.tokens()), s.upto, s.digests, s.breakpoints)


class PromptCache:
    """Which prompt prefixes are 'cached', with the real API's 5m / 1h expiry."""

    def __init__(self) -> None:
        self._entries: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def _alive(self, key: bytes, now: float) -> bool:
        e = self._entries.get(key)
        if e is None:
            return False
        if e[0] < now:
            del self._entries[key]
            return False
        self._entries[key] = (now + e[1], e[1])  # a hit refreshes the TTL
        self._entries.move_to_end(key)
        return True

    def apply(self, p: Prompt) -> dict[str, Any]:
        """Usage fields for this prompt, and records its breakpoints as cached."""
        usage: dict[str, Any] = {
            "input_tokens": p.total,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        }
        if not p.breakpoints:
            return usage
        now = time.monotonic()
        hit = -1
        for bp, _ in reversed(p.breakpoints):
            for j in range(bp, max(bp - CACHE_LOOKBACK, -1), -1):
                if self._alive(p.digests[j], now):
                    hit = j
                    break
            if hit >= 0:
                break
        read = p.upto[hit] if hit >= 0 else 0
        prev = read
        split = usage["cache_creation"]
        for bp, ttl in p.breakpoints:
            if bp > hit:
                split[f"ephemeral_{ttl}_input_tokens"] += p.upto[bp] - prev
                prev = p.upto[bp]
                self._entries[p.digests[bp]] = (now + CACHE_TTL[ttl], CACHE_TTL[ttl])
                self._entries.move_to_end(p.digests[bp])
        while len(self._entries) > CACHE_MAX_ENTRIES:
            self._entries.popitem(last=False)
        creation = prev - read
        usage["cache_read_input_tokens"] = read
        usage["cache_creation_input_tokens"] = creation
        usage["input_tokens"] = max(0, p.total - read - creation)
        return usage


# ---------------------------------------------------------------------------- validation


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise BadRequest(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_blocks(blocks: list[Any], where: str) -> None:
    for i, b in enumerate(blocks):
        _require(isinstance(b, dict), f"{where}.{i}: Input should be a valid dictionary")
        t = b.get("type")
        _require(isinstance(t, str), f"{where}.{i}.type: Field required")
        if t == "text":
            _require(isinstance(b.get("text"), str), f"{where}.{i}.text: Field required")
            _require(b["text"] != "", f"{where}.{i}.text: text content blocks must be non-empty")
        elif t == "tool_use":
            _require(isinstance(b.get("id"), str), f"{where}.{i}.id: Field required")
            _require(isinstance(b.get("name"), str), f"{where}.{i}.name: Field required")
        elif t == "tool_result":
            _require(isinstance(b.get("tool_use_id"), str), f"{where}.{i}.tool_use_id: Field required")
        elif t in ("image", "document"):
            _require(isinstance(b.get("source"), dict), f"{where}.{i}.source: Field required")


def validate_count(body: Any) -> None:
    """Checks shared by /v1/messages and /v1/messages/count_tokens."""
    _require(isinstance(body, dict), "body: Input should be a valid dictionary")
    _require("model" in body, "model: Field required")
    _require(isinstance(body["model"], str) and body["model"] != "", "model: Input should be a valid string")
    _require("messages" in body, "messages: Field required")
    msgs = body["messages"]
    _require(isinstance(msgs, list), "messages: Input should be a valid list")
    _require(len(msgs) > 0, "messages: at least one message is required")
    last = len(msgs) - 1
    for i, m in enumerate(msgs):
        _require(isinstance(m, dict), f"messages.{i}: Input should be a valid dictionary")
        _require("role" in m, f"messages.{i}.role: Field required")
        _require(m["role"] in ("user", "assistant"),
                 f"messages.{i}.role: Input should be 'user' or 'assistant'")
        _require("content" in m, f"messages.{i}.content: Field required")
        c = m["content"]
        _require(isinstance(c, (str, list)), f"messages.{i}.content: Input should be a valid list")
        empty = c == "" or c == []
        _require(not empty or (i == last and m["role"] == "assistant"),
                 f"messages.{i}: all messages must have non-empty content except for the "
                 "optional final assistant message")
        if isinstance(c, list):
            _validate_blocks(c, f"messages.{i}.content")
    system = body.get("system")
    if system is not None:
        _require(isinstance(system, (str, list)), "system: Input should be a valid list")
        if isinstance(system, list):
            _validate_blocks(system, "system")
    tools = body.get("tools")
    if tools is not None:
        _require(isinstance(tools, list), "tools: Input should be a valid list")
        for i, t in enumerate(tools):
            _require(isinstance(t, dict), f"tools.{i}: Input should be a valid dictionary")
            _require(isinstance(t.get("name"), str), f"tools.{i}.name: Field required")
            if t.get("type") in (None, "custom"):
                _require(isinstance(t.get("input_schema"), dict), f"tools.{i}.input_schema: Field required")
    tc = body.get("tool_choice")
    if tc is not None:
        _require(isinstance(tc, dict) and tc.get("type") in ("auto", "any", "tool", "none"),
                 "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if tc["type"] == "tool":
            _require(isinstance(tc.get("name"), str), "tool_choice.tool.name: Field required")
            names = {t.get("name") for t in tools or ()}
            _require(tc["name"] in names, f"tool_choice.name: tool '{tc['name']}' is not in `tools`")
        if tc["type"] in ("any", "tool"):
            _require(bool(tools), "tool_choice: `tools` must be provided when tool_choice forces tool use")
    th = body.get("thinking")
    if th is not None:
        _require(isinstance(th, dict) and th.get("type") in THINKING_TYPES,
                 "thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'")
        if th["type"] == "enabled":
            b = th.get("budget_tokens")
            _require(_is_int(b), "thinking.enabled.budget_tokens: Field required")
            _require(b >= 1024,
                     "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if th["type"] != "disabled" and isinstance(tc, dict):
            _require(tc.get("type") not in ("any", "tool"),
                     "Thinking may not be enabled when tool_choice forces tool use.")


def validate_messages(body: Any) -> None:
    validate_count(body)
    _require("max_tokens" in body, "max_tokens: Field required")
    mt = body["max_tokens"]
    _require(_is_int(mt), "max_tokens: Input should be a valid integer")
    _require(mt >= 1, "max_tokens: Input should be greater than or equal to 1")
    limit = output_limit(body["model"])
    if limit is not None:
        _require(mt <= limit[1], f"max_tokens: {mt} > {limit[1]}, which is the maximum allowed number of output "
                 f"tokens for {limit[0]}")
    th = body.get("thinking")
    if isinstance(th, dict) and th.get("type") == "enabled":
        _require(mt > th["budget_tokens"], "`max_tokens` must be greater than `thinking.budget_tokens`. "
                 "Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude/"
                 "extended-thinking#max-tokens-and-context-window-size")
    for k in ("stream",):
        _require(body.get(k) is None or isinstance(body[k], bool), f"{k}: Input should be a valid boolean")
    temp = body.get("temperature")
    if temp is not None:
        _require(isinstance(temp, (int, float)) and not isinstance(temp, bool),
                 "temperature: Input should be a valid number")
        _require(0 <= temp <= 1, "temperature: Input should be less than or equal to 1")
    ss = body.get("stop_sequences")
    if ss is not None:
        _require(isinstance(ss, list) and all(isinstance(x, str) for x in ss),
                 "stop_sequences: Input should be a valid list")


# ---------------------------------------------------------------------------- replies


def _last_user_text(body: dict[str, Any]) -> str:
    for m in reversed(body["messages"]):
        if m.get("role") != "user":
            continue
        c = m["content"]
        if isinstance(c, str):
            return c[:400]
        for b in reversed(c):
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str):
                return b["text"][:400]
        return "the tool results"
    return "the conversation"


def _pieces(words: list[str]) -> list[str]:
    """Word tokens as the model would stream them: the first bare, the rest space-led."""
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _sample_input(schema: Any, depth: int = 0) -> Any:
    """A small value that satisfies a JSON schema's required fields."""
    if not isinstance(schema, dict) or depth > 6:
        return None
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    if t == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: _sample_input(props.get(k), depth + 1) for k in schema.get("required") or ()}
    return {"string": "example", "integer": 1, "number": 1, "boolean": True, "array": []}.get(str(t))


@dataclass
class Reply:
    """One generated assistant turn, as content blocks plus streaming pieces."""

    blocks: list[dict[str, Any]]
    # Per block: the streamed fragments (text pieces, thinking pieces or JSON chunks).
    fragments: list[list[str]]
    output_tokens: int
    stop_reason: str
    stop_sequence: str | None


def generate(body: dict[str, Any], target_tokens: int) -> Reply:
    max_tokens: int = body["max_tokens"]
    blocks: list[dict[str, Any]] = []
    fragments: list[list[str]] = []
    used = 0
    th = body.get("thinking")
    if isinstance(th, dict) and th.get("type") in ("enabled", "adaptive", "between_tools"):
        words = ("Let me consider the request, it has "
                 f"{len(body['messages'])} messages, and answer it briefly.").split()
        pieces = _pieces(words)[: max(1, max_tokens - 1)]
        text = "".join(pieces)
        sig = base64.b64encode(hashlib.sha512(text.encode()).digest() * 2).decode()
        blocks.append({"type": "thinking", "thinking": text, "signature": sig})
        fragments.append(pieces)
        used += len(pieces)

    tc = body.get("tool_choice") or {}
    tools = [t for t in body.get("tools") or () if t.get("type") in (None, "custom")]
    if tc.get("type") in ("any", "tool") and tools:
        tool = next((t for t in tools if t["name"] == tc.get("name")), tools[0])
        inp = _sample_input(tool.get("input_schema")) or {}
        js = orjson.dumps(inp).decode()
        step = max(1, -(-len(js) // 3))
        chunks = [""] + [js[i : i + step] for i in range(0, len(js), step)]
        blocks.append({"type": "tool_use", "id": _rand_id("toolu_01", 22), "name": tool["name"],
                       "input": inp})
        fragments.append(chunks)
        return Reply(blocks, fragments, used + 8 + len(js) // CHARS_PER_TOKEN, "tool_use", None)

    echo = _last_user_text(body).split()[:16]
    words = ["Emulated", "reply", "to:", *echo]
    while len(words) < target_tokens:
        words.extend(_FILLER)
    pieces = _pieces(words[: max(1, target_tokens)])
    stop_reason, stop_sequence = "end_turn", None
    room = max_tokens - used
    if len(pieces) > room:
        pieces = pieces[: max(0, room)]
        stop_reason = "max_tokens"
    text = "".join(pieces)
    cut = None
    for seq in body.get("stop_sequences") or ():
        i = text.find(seq) if seq else -1
        if i >= 0 and (cut is None or i < cut[0]):
            cut = (i, seq)
    if cut is not None:
        text = text[: cut[0]]
        kept, n = [], 0
        for p in pieces:
            if n >= len(text):
                break
            kept.append(p[: len(text) - n])
            n += len(p)
        pieces = [p for p in kept if p]
        stop_reason, stop_sequence = "stop_sequence", cut[1]
    blocks.append({"type": "text", "text": text})
    fragments.append(pieces)
    return Reply(blocks, fragments, max(1, used + len(pieces)), stop_reason, stop_sequence)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _chunk(items: list[str], n: int) -> Iterator[str]:
    for i in range(0, len(items), n):
        yield "".join(items[i : i + n])


# ---------------------------------------------------------------------------- content-encoding


def supported_encodings() -> tuple[str, ...]:
    """Response codings the emulator can produce, most preferred first."""
    return ("br", "gzip") if brotli is not None else ("gzip",)


def pick_encoding(accept_encoding: str | None) -> str | None:
    """The coding to reply in for this Accept-Encoding (RFC 9110 q-values), or None for identity."""
    if not accept_encoding:
        return None
    q: dict[str, float] = {}
    for part in accept_encoding.split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip().lower()
        if not name:
            continue
        weight = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                try:
                    weight = float(v)
                except ValueError:
                    weight = 0.0
        q[name] = weight
    best: tuple[float, str] | None = None
    for coding in supported_encodings():
        w = q.get(coding, q.get("*", 0.0))
        if w > 0 and (best is None or w > best[0]):
            best = (w, coding)
    return best[1] if best else None


class StreamEncoder:
    """Encodes a response body piece by piece; each piece is flushed so a stream stays live."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        if coding == "br":
            self._br = brotli.Compressor()
        else:
            self._z = zlib.compressobj(wbits=31)  # gzip framing

    def chunk(self, data: bytes) -> bytes:
        if self.coding == "br":
            return bytes(self._br.process(data)) + bytes(self._br.flush())
        return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        return bytes(self._br.finish()) if self.coding == "br" else self._z.flush(zlib.Z_FINISH)


def encode_body(coding: str, body: bytes) -> bytes:
    e = StreamEncoder(coding)
    return e.chunk(body) + e.end()


# ---------------------------------------------------------------------------- server


@dataclass
class EmulatorConfig:
    api_key: str
    latency_ms: float = 0.0
    tokens_per_second: float = 0.0
    # fault name -> probability per request (see FAULTS).
    fault_rates: dict[str, float] = field(default_factory=dict)
    output_tokens: int = 24
    seed: int | None = None
    record_limit: int = 200
    max_body_bytes: int = DEFAULT_MAX_BODY
    # "immediate": a Message Batch ends at create; "manual": it stays in_progress until a test
    # ends it (POST /_emulator/batches/{id}/end). Never timing-dependent.
    batch_mode: str = "immediate"


def error_response(status: int, etype: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"type": "error", "error": {"type": etype, "message": message}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


_STATUS_ERRORS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 529: "overloaded_error",
}


class Emulator:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.records: deque[dict[str, Any]] = deque(maxlen=config.record_limit)
        # Sequence numbers: the last one given (never reset, not even by DELETE), the highest one no
        # longer kept (dropped by the ring or cleared), and this process's identity, so a mark taken
        # from another emulator process (a restart) is refused instead of reading as "nothing new".
        self.last_seq = 0
        self.dropped_through = 0
        self.instance = secrets.token_hex(8)
        self.cache = PromptCache()
        self._rng = random.Random(config.seed)
        # x-emulator-hold: name -> released by POST /_emulator/release/{name} (tests order faults).
        self._holds: dict[str, asyncio.Event] = {}
        from emulators.anthropic_objects import ObjectEndpoints  # imports this module's helpers

        self.objects = ObjectEndpoints(self)

    # -- app

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._middleware])
        app.on_response_prepare.append(self._stamp)
        app[EMULATOR_KEY] = self
        r = app.router
        r.add_post("/v1/messages", self.messages)
        r.add_post("/v1/messages/count_tokens", self.count_tokens)
        r.add_get("/v1/models", self.list_models)
        r.add_get("/v1/models/{model_id}", self.get_model)
        self.objects.register(r)
        r.add_get("/_emulator/requests", self.get_records)
        r.add_delete("/_emulator/requests", self.clear_records)
        r.add_get("/_emulator/requests/mark", self.mark_records)
        r.add_get("/_emulator/health", self.health)
        r.add_post("/_emulator/release/{name}", self.release)
        return app

    @staticmethod
    async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
        rid = request.get(RID_KEY)
        if rid:
            response.headers.setdefault("request-id", rid)
        # x-emulator-response-header: NAME=VALUE (repeatable): the reply carries that header too, as a hostile
        # or broken provider's might (tests prove the gateway drops what a provider must not set).
        for spec in request.headers.getall("x-emulator-response-header", ()):
            name, sep, value = spec.partition("=")
            if sep and name.strip():
                response.headers[name.strip()] = value.strip()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request[RID_KEY] = _rand_id("req_011C", 20)
        if request.path.startswith("/_emulator/"):
            return await handler(request)
        rec: dict[str, Any] = {
            "time": time.time(), "method": request.method, "path": request.path,
            "query_string": request.query_string, "request_id": request[RID_KEY],
            "headers": _headers_dict(request), "body_length": 0, "body_sha256": None, "status": None,
        }
        self._keep(rec)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            rec["body_length"] = request.content_length
            rec["status"] = 413
            return error_response(413, "request_too_large",
                                  "Request exceeds the maximum allowed number of bytes.")
        rec["body_length"] = len(body)
        rec["body_sha256"] = hashlib.sha256(body).hexdigest()
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = error_response(e.status, _STATUS_ERRORS.get(e.status, "api_error"), e.reason)
        except _ConnectionAborted:
            # The socket is gone; aiohttp's write of this placeholder fails quietly.
            rec["status"] = "reset"
            return web.Response(status=500)
        if rec["status"] is None:
            rec["status"] = resp.status
        return _encoded(request, resp)

    # -- common gate: auth, version, latency, faults

    async def _gate(self, request: web.Request) -> web.Response | None:
        # Newer SDKs send the key as `Authorization: Bearer`, older ones as x-api-key.
        key = request.headers.get("x-api-key")
        if not key:
            auth = request.headers.get("authorization", "")
            key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not key:
            return error_response(401, "authentication_error", "x-api-key header is required")
        if not hmac.compare_digest(key.encode(), self.config.api_key.encode()):
            return error_response(401, "authentication_error", "invalid x-api-key")
        version = request.headers.get("anthropic-version")
        if not version:
            return error_response(400, "invalid_request_error", "anthropic-version: header is required")
        if not API_VERSION_RE.fullmatch(version):
            return error_response(400, "invalid_request_error",
                                  f"anthropic-version: invalid version '{version}'")
        latency = _float_header(request, "x-emulator-latency-ms", self.config.latency_ms)
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        fault = self._pick_fault(request)
        if fault == "429":
            return error_response(
                429, "rate_limit_error",
                "This request would exceed your organization's rate limit. Please wait and retry "
                "after the time in the retry-after header.", headers={"retry-after": "1"})
        if fault == "529":
            return error_response(529, "overloaded_error", "Overloaded")
        if fault == "500":
            return error_response(500, "api_error", "Internal server error")
        if fault == "reset":
            _abort(request)
        if fault is not None:
            if fault not in FAULTS:
                return error_response(400, "invalid_request_error",
                                      f"x-emulator-fault: use one of {', '.join(FAULTS)}")
            request[FAULT_KEY] = fault
        return None

    def _pick_fault(self, request: web.Request) -> str | None:
        h = request.headers.get("x-emulator-fault")
        if h:
            h = h.strip().lower()
            return None if h == "none" else h  # "none" opts out of the CLI's random faults
        for name, rate in self.config.fault_rates.items():
            if rate > 0 and self._rng.random() < rate:
                return name
        return None

    async def _json(self, request: web.Request) -> Any:
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"There was an issue with the formatting of your request body: {e}") from None

    # -- endpoints

    async def _checked_body(
        self, request: web.Request, validate: Callable[[Any], None]
    ) -> dict[str, Any] | web.StreamResponse:
        """Auth, version, faults and latency, then the parsed and validated body (or the error reply)."""
        denied = await self._gate(request)
        if denied is not None:
            return denied
        try:
            body = await self._json(request)
            validate(body)
        except BadRequest as e:
            return error_response(400, "invalid_request_error", str(e))
        return body  # type: ignore[no-any-return]

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._checked_body(request, validate_messages)
        if isinstance(body, web.StreamResponse):
            return body
        missing_file = self.objects.check_message_files(request, body)
        if missing_file is not None:
            return missing_file
        usage = self.cache.apply(scan_prompt(body))
        target = int(_float_header(request, "x-emulator-output-tokens", self.config.output_tokens))
        reply = generate(body, target)
        tps = _float_header(request, "x-emulator-tokens-per-second", self.config.tokens_per_second)
        msg_id = _rand_id("msg_01", 22)
        if body.get("stream"):
            return await self._stream(request, body, msg_id, usage, reply, tps)
        if tps > 0:
            await asyncio.sleep(reply.output_tokens / tps)
        message = {
            "id": msg_id, "type": "message", "role": "assistant", "model": body["model"],
            "content": reply.blocks, "stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence,
            "usage": {**usage, "output_tokens": reply.output_tokens, "service_tier": "standard"},
        }
        return web.Response(body=orjson.dumps(message), content_type="application/json")

    async def _stream(self, request: web.Request, body: dict[str, Any], msg_id: str, usage: dict[str, Any],
                      reply: Reply, tps: float) -> web.StreamResponse:
        coding = pick_encoding(request.headers.get("accept-encoding"))
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        if coding:
            headers.update({"content-encoding": coding, "vary": "accept-encoding"})
        encoder = StreamEncoder(coding) if coding else None
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        out: list[bytes] = []

        async def flush() -> None:
            data = b"".join(out)
            out.clear()
            if data:
                await resp.write(encoder.chunk(data) if encoder else data)

        async def end() -> web.StreamResponse:
            await flush()
            if encoder:
                await resp.write(encoder.end())
            await resp.write_eof()
            return resp

        start = {
            "id": msg_id, "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1, "service_tier": "standard"},
        }
        out.append(_sse("message_start", {"type": "message_start", "message": start}))
        fault = request.get(FAULT_KEY)
        # Mid-stream faults strike after half of the first block's deltas (at least one),
        # as a real stream cut off while the model is generating.
        cut_after = -1
        for idx, (block, frags) in enumerate(zip(reply.blocks, reply.fragments, strict=True)):
            kind = block["type"]
            if kind == "thinking":
                empty: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [{"type": "thinking_delta", "thinking": t} for t in _chunk(frags, TOKENS_PER_DELTA)]
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
            elif kind == "tool_use":
                empty = {**block, "input": {}}
                deltas = [{"type": "input_json_delta", "partial_json": t} for t in frags]
            else:
                empty = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": t} for t in _chunk(frags, TOKENS_PER_DELTA)]
            if idx == 0 and fault in ("midstream-reset", "midstream-error"):
                cut_after = max(1, len(deltas) // 2)
            out.append(_sse("content_block_start", {"type": "content_block_start", "index": idx,
                                                    "content_block": empty}))
            if idx == 0:
                out.append(_sse("ping", {"type": "ping"}))
            for n, d in enumerate(deltas, 1):
                out.append(_sse("content_block_delta",
                                {"type": "content_block_delta", "index": idx, "delta": d}))
                if n == cut_after:
                    await flush()
                    hold = request.headers.get("x-emulator-hold")
                    if hold:  # the fault strikes only once the test has seen the output so far
                        await self.hold(hold)
                    if fault == "midstream-reset":
                        await _drained(request)  # what was written reaches the peer, then the reset
                        _abort(request)
                    out.append(_sse("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                         "message": "Overloaded"}}))
                    return await end()
                if tps > 0:
                    # Flush what we have, then wait as long as the model would take for it.
                    await flush()
                    await asyncio.sleep(TOKENS_PER_DELTA / tps)
            out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": idx}))
        final_usage = {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens",
                                             "cache_read_input_tokens")}
        final_usage["output_tokens"] = reply.output_tokens
        out.append(_sse("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": reply.stop_reason,
                                                    "stop_sequence": reply.stop_sequence},
                                          "usage": final_usage}))
        out.append(_sse("message_stop", {"type": "message_stop"}))
        return await end()

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await self._checked_body(request, validate_count)
        if isinstance(body, web.StreamResponse):
            return body
        return web.Response(body=orjson.dumps({"input_tokens": scan_prompt(body).total}),
                            content_type="application/json")

    async def list_models(self, request: web.Request) -> web.Response:
        denied = await self._gate(request)
        if denied is not None:
            return denied
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            return error_response(400, "invalid_request_error", "limit: Input should be between 1 and 1000")
        ids = [m[0] for m in MODELS]
        after, before = request.query.get("after_id"), request.query.get("before_id")
        lo, hi = 0, len(ids)
        if after:
            lo = ids.index(after) + 1 if after in ids else len(ids)
        if before:
            hi = ids.index(before) if before in ids else 0
        page = list(MODELS[lo:hi])
        if before and not after:
            chosen, has_more = page[-limit:], len(page) > limit
        else:
            chosen, has_more = page[:limit], len(page) > limit
        data = [_model_obj(m) for m in chosen]
        return web.Response(body=orjson.dumps({
            "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
        }), content_type="application/json")

    async def get_model(self, request: web.Request) -> web.Response:
        denied = await self._gate(request)
        if denied is not None:
            return denied
        mid = request.match_info["model_id"]
        m = _MODEL_BY_ID.get(mid)
        if m is None:
            return error_response(404, "not_found_error", f"model: {mid}")
        return web.Response(body=orjson.dumps(_model_obj(m)), content_type="application/json")

    # -- inspection (no auth: tests read what the gateway forwarded)

    def _keep(self, rec: dict[str, Any]) -> None:
        self.last_seq += 1
        rec["seq"] = self.last_seq
        limit = self.records.maxlen
        if limit is not None and len(self.records) >= limit:
            # The ring drops its oldest record (or, with a limit of 0, this one).
            self.dropped_through = self.records[0]["seq"] if self.records else rec["seq"]
        self.records.append(rec)

    def _position(self) -> dict[str, Any]:
        return {"instance": self.instance, "last_seq": self.last_seq, "dropped_through": self.dropped_through}

    async def get_records(self, request: web.Request) -> web.Response:
        """Every kept record, oldest first; with `?after=N`, `{instance, last_seq, dropped_through,
        records}` where records are exactly those with seq > N. A read whose records were already
        dropped (N < dropped_through) answers 410, and one from the future or from another process
        (`instance=` given and not this one) answers 409: neither may pass as "nothing arrived"."""
        after_raw = request.query.get("after")
        if after_raw is None:
            return web.Response(body=orjson.dumps(list(self.records)), content_type="application/json")
        if not re.fullmatch(r"[0-9]{1,18}", after_raw):
            return error_response(400, "invalid_request_error", f"after: not a sequence number: {after_raw!r}")
        after = int(after_raw)
        instance = request.query.get("instance")
        if (instance is not None and instance != self.instance) or after > self.last_seq:
            return error_response(409, "invalid_request_error",
                                  f"mark {instance}:{after} is not of this emulator ({self.instance}:{self.last_seq})")
        if after < self.dropped_through:
            return error_response(410, "not_found_error",
                                  f"records {after + 1}..{self.dropped_through} were dropped (ring of "
                                  f"{self.records.maxlen}, or cleared); the rest would not be all since the mark")
        recs = [r for r in self.records if r["seq"] > after]
        return web.Response(body=orjson.dumps({**self._position(), "records": recs}), content_type="application/json")

    async def mark_records(self, request: web.Request) -> web.Response:
        """Where the record sequence stands now: a mark for a later `?after=` read."""
        return web.Response(body=orjson.dumps(self._position()), content_type="application/json")

    async def clear_records(self, request: web.Request) -> web.Response:
        # Sequence numbers go on: a mark taken before a clear cannot read the cleared records (410).
        self.records.clear()
        self.dropped_through = self.last_seq
        return web.Response(body=b'{"cleared":true}', content_type="application/json")

    def _hold(self, name: str) -> asyncio.Event:
        return self._holds.setdefault(name, asyncio.Event())

    async def hold(self, name: str, limit_s: float = 30.0) -> None:
        """Wait until a test releases `name` (bounded, so a forgotten hold cannot hang a stream)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hold(name).wait(), limit_s)
        self._holds.pop(name, None)

    async def release(self, request: web.Request) -> web.Response:
        if len(self._holds) >= 1000:  # releases nobody waits for must not pile up
            self._holds = {k: v for k, v in self._holds.items() if not v.is_set()}
        self._hold(request.match_info["name"]).set()
        return web.Response(body=b'{"released":true}', content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")


EMULATOR_KEY = web.AppKey("emulator", Emulator)


class _ConnectionAborted(Exception):
    """Raised after the socket was aborted on purpose: nothing more may be written."""


def _encoded(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """A whole-body reply in the coding the client asked for (streams encode themselves)."""
    if not isinstance(resp, web.Response) or resp.prepared or "content-encoding" in resp.headers:
        return resp
    body = resp.body
    coding = pick_encoding(request.headers.get("accept-encoding"))
    if coding is None or not isinstance(body, bytes) or not body:
        return resp
    resp.body = encode_body(coding, body)
    resp.headers["content-encoding"] = coding
    resp.headers["vary"] = "accept-encoding"
    return resp


async def _drained(request: web.Request, limit_s: float = 2.0) -> None:
    """Wait (bounded) until the transport has handed every written byte to the kernel."""
    deadline = time.monotonic() + limit_s
    t = request.transport
    while t is not None and t.get_write_buffer_size() > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
    raise _ConnectionAborted()


def _headers_dict(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in request.headers.items():
        k = k.lower()
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def _float_header(request: web.Request, name: str, default: float) -> float:
    v = request.headers.get(name)
    if v is None:
        return float(default)
    try:
        return max(0.0, float(v))
    except ValueError:
        return float(default)


def _model_obj(m: tuple[str, str, str, str]) -> dict[str, Any]:
    return {"type": "model", "id": m[0], "display_name": m[1], "created_at": m[2], "lifecycle": m[3]}


def parse_fault_rates(spec: str | None) -> dict[str, float]:
    """'429=0.05,reset=0.01' -> {'429': 0.05, 'reset': 0.01}; a bare '0.1' means 529 at 10%."""
    rates: dict[str, float] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, rate = part.rpartition("=")
        name = name.strip().lower() or "529"
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; choose from {', '.join(FAULTS)}")
        value = float(rate)
        if not 0 <= value <= 1:
            raise ValueError(f"fault rate for {name} must be within 0..1, got {value}")
        rates[name] = value
    return rates


# ---------------------------------------------------------------------------- running


async def start(host: str = "127.0.0.1", port: int = 0, api_key: str = "test-key", **options: Any
                ) -> tuple[web.AppRunner, int]:
    """Serve in the current event loop; returns the runner (call `cleanup()`) and bound port.

    `options` are EmulatorConfig fields; the Emulator is `runner.app[EMULATOR_KEY]`.
    """
    emulator = Emulator(EmulatorConfig(api_key=api_key, **options))
    runner = web.AppRunner(emulator.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, bound


def write_ready(path: str, host: str, port: int) -> None:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(orjson.dumps({"address": address, "pid": os.getpid()}))
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m emulators.anthropic", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 binds a free port")
    ap.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                    help=f"accepted x-api-key (default: ${API_KEY_ENV})")
    ap.add_argument("--ready-file", help="written as {'address': 'host:port', 'pid': n} once serving")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="delay before every API response")
    ap.add_argument("--tokens-per-second", type=float, default=0.0, help="output pacing; 0 = none")
    ap.add_argument("--output-tokens", type=int, default=24, help="length of generated replies")
    ap.add_argument("--fault-rate", default="",
                    help=f"e.g. '429=0.05,reset=0.01' (faults: {', '.join(FAULTS)})")
    ap.add_argument("--seed", type=int, default=None, help="seed for random faults")
    ap.add_argument("--record-limit", type=int, default=200, help="requests kept for /_emulator/requests")
    ap.add_argument("--batch-mode", choices=("immediate", "manual"), default="immediate",
                    help="Message Batches end at create, or when POST /_emulator/batches/{id}/end is called")
    args = ap.parse_args(argv)
    if not args.api_key:
        ap.error(f"--api-key or ${API_KEY_ENV} is required")
    try:
        args.fault_rates = parse_fault_rates(args.fault_rate)
    except ValueError as e:
        ap.error(str(e))
    return args


async def serve(args: argparse.Namespace) -> None:
    runner, port = await start(
        args.host, args.port, args.api_key, latency_ms=args.latency_ms,
        tokens_per_second=args.tokens_per_second, fault_rates=args.fault_rates,
        output_tokens=args.output_tokens, seed=args.seed, record_limit=args.record_limit,
        batch_mode=args.batch_mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready_file:
        write_ready(args.ready_file, args.host, port)
    log.info("anthropic emulator serving on %s:%d", args.host, port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("CCR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s emulator %(levelname)s %(message)s")
    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
