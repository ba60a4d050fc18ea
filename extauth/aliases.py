"""Where a request names its model, so the upstream can put the concrete id there (model aliases).

An alias (config `aliases`, resolved by ccr/routing.py) must reach the provider as the model it
resolves to. The passthrough path runs no Python, so extauth finds the exact bytes of the model
and the upstream's Lua step (router/alias.lua) replaces just those, per attempt: every other byte
of the body stays as the client sent it.
"""

from __future__ import annotations

import json

from ccr.contract import AUTHZ_MODEL_PATH, AUTHZ_MODEL_SPAN
from extauth.deny import Deny
from extauth.endpoints import EndpointMatch
from extauth.lean_json import Buffer

_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def top_level_spans(body: Buffer, key: str) -> list[tuple[int, int]]:
    """(start, end) byte offsets of every top-level value of `key` in a JSON object body, in order.

    Each top-level value is skipped by the C scanner, so a key inside a nested object does not count and a
    key given twice shows twice (orjson, like most parsers, keeps only the last: a provider need not)."""
    raw = bytes(body)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Deny(400, "invalid_request_error", "request body is not valid UTF-8") from None
    # Offsets below are in characters; bytes are what the upstream rewrites.
    ascii_only = len(text) == len(raw)
    found: list[tuple[int, int]] = []
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        raise Deny(400, "invalid_request_error", "request body must be a JSON object with a 'model' field")
    i = _skip(text, i + 1)
    if text[i:i + 1] == "}":
        i = len(text)
    while i < len(text):
        name, i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        i = _skip(text, i + 1)  # the ':'
        start = i
        _, i = _DECODER.raw_decode(text, i)
        if name == key:
            found.append((start, i))
        i = _skip(text, i)
        if text[i:i + 1] == "}":
            break
        i = _skip(text, i + 1)  # the ','
    if not ascii_only:
        found = [(len(text[:s].encode()), len(text[:e].encode())) for s, e in found]
    return found


def model_value_span(body: Buffer) -> tuple[int, int]:
    """(start, end) byte offsets of the top-level "model" value of a JSON object body. A body that names the
    model twice is refused: the policy and the provider must never read two different models from one request."""
    found = top_level_spans(body, "model")
    if len(found) != 1:
        raise Deny(400, "invalid_request_error", "model: give the model exactly once in the request body")
    return found[0]


def alias_rewrite(endpoint: EndpointMatch, body: Buffer, path: str, served: str) -> dict[str, str]:
    """AUTHZ_NS metadata telling the upstream where to put `served` in this request."""
    if endpoint.endpoint.model_in_path:
        named = endpoint.param("bedrock_model") or ""
        prefix = "/model/"
        rest = path[len(prefix) + len(named):]
        return {AUTHZ_MODEL_PATH: f"{prefix}{served}{rest}"}
    s, e = model_value_span(body)
    return {AUTHZ_MODEL_SPAN: f"{s},{e}"}
