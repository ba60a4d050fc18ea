"""The Anthropic error shape for every error the gateway itself returns.

Clients and agents parse these like the provider's own errors, so all of our
services build them here.
"""

from __future__ import annotations

import orjson


def error_body(kind: str, message: str) -> bytes:
    """`{"type":"error","error":{"type":kind,"message":message}}` as compact JSON bytes."""
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
