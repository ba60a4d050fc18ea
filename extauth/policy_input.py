"""The policy's input document, version 1: pure functions from a request's facts to `input`.

Everything a policy may read is gathered here, once, into immutable `RequestFacts` (hashable, so
a decision can be cached by exactly the facts it was made from) and turned into the JSON document
the Rego policy evaluates by `document()`. policies/README.md ("Input v1") documents every field.

Left out on purpose:
- credentials (Authorization, Proxy-Authorization, X-API-Key, Cookie): a policy decides on the
  principal they prove, never on the secret; x-ccr-* (the gateway's own, never a client's);
- per-request noise that would make every decision unique and is not a policy fact: the request
  id, content-length (the byte size is `request.size`), Envoy's x-envoy-*, trace context, the
  source port;
- the text the request carries, unless the bundle asks for it (`data.policy_input.text`): a 20 MB
  body must not become a 20 MB policy input (docs/large-bodies.md). It is bounded even then.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ccr.contract import CCR_HEADER_PREFIX, H_CLIENT_REQUEST_ID, H_REGION_HINT, H_REQUEST_ID
from extauth.endpoints import EndpointMatch
from extauth.principal import Principal

INPUT_VERSION = 1

# Headers that carry a credential: never in the input (nor in a decision log built from it).
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})
# Headers that differ on every request without being a policy fact (they would defeat the cache).
NOISE_HEADERS = frozenset({H_REQUEST_ID, H_CLIENT_REQUEST_ID, "content-length", "traceparent", "tracestate",
                           "b3", "x-forwarded-for"})
_NOISE_PREFIXES = ("x-envoy-", "x-b3-", CCR_HEADER_PREFIX)

# Bounds on the text put into the input when a bundle asks for it (characters and pieces).
DEFAULT_MAX_TEXT_CHARS = 256 * 1024
MAX_TEXT_PIECES = 1024
MAX_TOOLS = 1024  # more tool definitions than this in one request are refused (400), not put in the input
MAX_DEPTH = 64  # tool inputs / tool results nested deeper are not walked (and `text_truncated` says so)
THINKING_TYPES = ("enabled", "disabled", "adaptive", "between_tools")
# A region name as a client may send it in the hint header: short, lower-case, DNS-label-like.
_REGION_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
MAX_REGION_LEN = 32

TextOf = Callable[[str], str]


class InputError(ValueError):
    """A request fact the policy needs is malformed (the request is refused with 400, never guessed at)."""


@dataclass(frozen=True, slots=True)
class TextPiece:
    loc: str  # where in the body: "system", "messages[3].content[1]", "messages[2].content[0].input.query"
    kind: str  # system | message | thinking | tool_input | tool_result | document
    text: str

    def policy_input(self) -> dict[str, str]:
        return {"loc": self.loc, "kind": self.kind, "text": self.text}


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What a Messages body says that policies decide on (None: the body does not say)."""

    max_tokens: int | None = None
    stream: bool | None = None
    # budget_tokens; 0 when thinking is disabled; max_tokens for adaptive thinking without a budget
    thinking_budget: int | None = None
    tools: tuple[str, ...] | None = None  # tool names in order (None: no `tools` field)
    thinking: str | None = None  # thinking.type: enabled | disabled | adaptive | between_tools


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """Every input fact beyond (principal, method, path, model, endpoint, pii); immutable."""

    query: tuple[tuple[str, tuple[str, ...]], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    host: str | None = None
    source_address: str | None = None
    source_spiffe_id: str | None = None
    size: int = 0
    region_hint: str | None = None
    body: BodyFacts | None = None
    text: tuple[TextPiece, ...] | None = None  # None: not materialised (the bundle did not ask)
    text_truncated: bool = False
    # The model id as the client named it, when it was an alias (`model` is then the id it resolves to).
    model_requested: str | None = None


# -- pure mappings ------------------------------------------------------------------


def policy_headers(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Request headers as the policy sees them: lower-case names, sorted; no credentials, no
    pseudo-headers (method, path and host are their own fields), no per-request noise."""
    out = []
    for k, v in headers.items():
        name = k.lower()
        if (name[:1] == ":" or name in CREDENTIAL_HEADERS or name in NOISE_HEADERS
                or name.startswith(_NOISE_PREFIXES)):
            continue
        out.append((name, v))
    out.sort()
    return tuple(out)


def policy_query(target: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The query string of a request target as sorted (name, values) pairs; blank values kept."""
    _, _, query = target.partition("?")
    if not query:
        return ()
    parsed = urllib.parse.parse_qs(query.partition("#")[0], keep_blank_values=True)
    return tuple(sorted((k, tuple(v)) for k, v in parsed.items()))


def region_hint(headers: Mapping[str, str]) -> str | None:
    """The region a client asks for (H_REGION_HINT); a value that is not a plain region name is
    refused, not ignored: a request meant for one region must not silently go anywhere."""
    raw = headers.get(H_REGION_HINT)
    if raw is None:
        return None
    value = raw.strip().lower()
    if not value or len(value) > MAX_REGION_LEN or not set(value) <= _REGION_CHARS:
        raise InputError(f"{H_REGION_HINT}: must be a region name such as 'eu' or 'us-east' "
                         f"(letters, digits, '-' or '_', at most {MAX_REGION_LEN})")
    return value


# The largest integer taken from a body: orjson, which writes the policy's input, writes none larger, and the
# body's parser (extauth/lean_json.py) keeps larger ones as integers where orjson read doubles.
MAX_INT = 2**64 - 1


def _int_field(doc: Mapping[str, Any], name: str, where: str = "") -> int | None:
    v = doc.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_INT:
        raise InputError(f"{where}{name}: Input should be a non-negative integer")
    return v


def body_facts(doc: Mapping[str, Any]) -> BodyFacts:
    """max_tokens, stream, thinking budget and tool names of a Messages body. A value of the
    wrong type is refused (InputError): a ceiling compared with a string is not a ceiling."""
    max_tokens = _int_field(doc, "max_tokens")
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InputError("stream: Input should be a valid boolean")
    thinking = doc.get("thinking")
    budget: int | None = None
    mode: str | None = None
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in THINKING_TYPES:
            raise InputError(f"thinking.type: Input should be one of {', '.join(THINKING_TYPES)}")
        mode = thinking["type"]
        if mode == "disabled":
            budget = 0
        else:
            budget = _int_field(thinking, "budget_tokens", "thinking.")
            if budget is None:
                if mode == "enabled":
                    raise InputError("thinking.budget_tokens: Field required when thinking is enabled")
                # Adaptive thinking has no budget of its own: it may use up to max_tokens.
                budget = max_tokens
    tools_v = doc.get("tools")
    tools: tuple[str, ...] | None = None
    if tools_v is not None:
        if not isinstance(tools_v, list):
            raise InputError("tools: Input should be a valid list")
        if len(tools_v) > MAX_TOOLS:
            raise InputError(f"tools: at most {MAX_TOOLS} tools in one request; this one has {len(tools_v)}")
        names = []
        for i, tool in enumerate(tools_v):
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str) or not name:
                raise InputError(f"tools.{i}.name: Field required (a non-empty string)")
            names.append(name)
        tools = tuple(names)
    return BodyFacts(max_tokens, stream, budget, tools, mode)


def _prefix(value: str, text_of: TextOf, chars: int) -> str:
    """At least the first `chars` characters of a text (all of it when shorter), decoding a long
    string left in the body (extauth/lean_json.py LongStrings) only that far."""
    chunks = getattr(text_of, "chunks", None)
    if chunks is None:
        return text_of(value)
    out: list[str] = []
    n = 0
    for c in chunks(value):
        out.append(c)
        n += len(c)
        if n > chars:
            break
    return "".join(out)


class _TextBudget:
    __slots__ = ("left", "out", "text_of", "truncated")

    def __init__(self, chars: int, text_of: TextOf) -> None:
        self.left = chars
        self.out: list[TextPiece] = []
        self.text_of = text_of
        self.truncated = False

    def add(self, loc: str, kind: str, value: str) -> None:
        """`value` as the body holds it (maybe a placeholder): decoded only while the budget lasts."""
        if self.left <= 0 or len(self.out) >= MAX_TEXT_PIECES:
            self.truncated = True
            return
        if getattr(self.text_of, "size", len)(value) > self.left:  # decode only what the budget takes
            text = _prefix(value, self.text_of, self.left)
        else:
            text = self.text_of(value)
        if len(text) > self.left:
            text = text[: self.left]
            self.truncated = True
        self.left -= len(text)
        self.out.append(TextPiece(loc, kind, text))


def _strings(v: Any, loc: str, kind: str, b: _TextBudget, depth: int) -> None:
    if depth > MAX_DEPTH:
        b.truncated = True
        return
    if isinstance(v, str):
        b.add(loc, kind, v)
    elif isinstance(v, dict):
        for k, sub in v.items():
            _strings(sub, f"{loc}.{k}", kind, b, depth + 1)
    elif isinstance(v, list):
        for i, sub in enumerate(v):
            _strings(sub, f"{loc}[{i}]", kind, b, depth + 1)


def _content(content: Any, loc: str, kind: str, b: _TextBudget, depth: int) -> None:
    """A content value (string or blocks); `kind` is what plain text in it counts as."""
    if depth > MAX_DEPTH:
        b.truncated = True
        return
    if isinstance(content, str):
        b.add(loc, kind, content)
        return
    if not isinstance(content, list):
        return
    for i, blk in enumerate(content):
        if not isinstance(blk, dict):
            continue
        bl = f"{loc}[{i}]"
        t = blk.get("type")
        if t == "text" and isinstance(blk.get("text"), str):
            b.add(bl, kind, blk["text"])
        elif t == "thinking" and isinstance(blk.get("thinking"), str):
            b.add(bl, "thinking", blk["thinking"])
        elif t in ("tool_use", "server_tool_use"):
            _strings(blk.get("input"), f"{bl}.input", "tool_input", b, depth + 1)
        elif t == "tool_result" or (isinstance(t, str) and t.endswith("_tool_result")):
            _content(blk.get("content"), f"{bl}.content", "tool_result", b, depth + 1)
        elif t == "document":
            src = blk.get("source")
            if isinstance(src, dict) and src.get("type") == "text" and isinstance(src.get("data"), str):
                b.add(f"{bl}.source.data", "document", src["data"])
            elif isinstance(src, dict) and src.get("type") == "content":
                _content(src.get("content"), f"{bl}.source.content", "document", b, depth + 1)


def request_text(doc: Mapping[str, Any], text_of: TextOf = str,
                 max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> tuple[tuple[TextPiece, ...], bool]:
    """The text a Messages body carries, in body order, each piece with its location and kind
    (system, message, thinking, tool_input, tool_result, document), at most `max_chars`
    characters and MAX_TEXT_PIECES pieces in all; and whether anything was left out.
    `text_of` maps a long string left in the body as a placeholder (extauth/lean_json.py) to its text."""
    b = _TextBudget(max_chars, text_of)
    _content(doc.get("system"), "system", "system", b, 0)
    msgs = doc.get("messages")
    if isinstance(msgs, list):
        for i, m in enumerate(msgs):
            if isinstance(m, dict):
                _content(m.get("content"), f"messages[{i}].content", "message", b, 0)
    return tuple(b.out), b.truncated


def source_address(attributes: Any) -> str | None:
    """The downstream peer's IP as Envoy reports it (CheckRequest.attributes.source); no port."""
    sock = attributes.source.address.socket_address
    return sock.address or None


def request_facts(target: str, headers: Mapping[str, str], host: str | None, source: str | None,
                  peer_spiffe_id: str | None, size: int, doc: Mapping[str, Any] | None,
                  text_of: TextOf = str, text_chars: int | None = None) -> RequestFacts:
    """Every fact of one request beyond (principal, method, path, model, endpoint, pii), as the
    Check handler gathers them. `doc`: the parsed Messages body (None for other requests);
    `text_chars`: materialise at most this much of its text (None: the policy does not read it).
    Raises InputError for a fact that is malformed."""
    body = body_facts(doc) if doc is not None else None
    text = None
    truncated = False
    if doc is not None and text_chars is not None:
        text, truncated = request_text(doc, text_of, text_chars)
    return RequestFacts(query=policy_query(target), headers=policy_headers(headers), host=host or None,
                        source_address=source, source_spiffe_id=peer_spiffe_id, size=size,
                        region_hint=region_hint(headers), body=body, text=text, text_truncated=truncated)


# -- the document -------------------------------------------------------------------


def document(principal: Principal, method: str, path: str, model: str | None,
             endpoint: EndpointMatch | None = None, pii: tuple | None = None,
             facts: RequestFacts | None = None) -> dict[str, Any]:
    """The input document v1 (policies/README.md, "Input v1")."""
    f = facts if facts is not None else RequestFacts()
    body = f.body if f.body is not None else BodyFacts()
    request: dict[str, Any] = {
        "method": method, "path": path, "host": f.host,
        "query": {k: list(v) for k, v in f.query},
        "headers": dict(f.headers),
        "endpoint": None, "kind": None, "params": {},
        "model": model,
        "max_tokens": body.max_tokens,
        "stream": body.stream,
        "thinking": body.thinking,
        "thinking_budget": body.thinking_budget,
        "tools": list(body.tools) if body.tools is not None else [],
        "tool_count": len(body.tools) if body.tools is not None else 0,
        "size": f.size,
        "region_hint": f.region_hint,
    }
    if endpoint is not None:
        request.update(endpoint.policy_input())
    if pii is not None:  # kinds and locations only: the values never reach the policy or a log
        request["pii"] = [p.policy_input() for p in pii]
    if f.model_requested is not None:  # an alias: `model` is what it resolves to (policies/README.md)
        request["model_requested"] = f.model_requested
    if f.text is not None:
        request["text"] = [t.policy_input() for t in f.text]
        request["text_truncated"] = f.text_truncated
    return {
        "version": INPUT_VERSION,
        "principal": principal.policy_input(),
        "source": {"address": f.source_address, "spiffe_id": f.source_spiffe_id},
        "request": request,
    }
