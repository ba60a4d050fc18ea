"""The body capture filter (router/capture.lua) of the adapter's clusters (docs/audit.md "Bodies")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccr.config import GatewayConfig

CAPTURE_LUA = Path(__file__).with_name("capture.lua")
_LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"


def capture_filters(config: GatewayConfig) -> list[dict[str, Any]]:
    """First of the upstream filters of the adapter's clusters (translate, objects), so that it sees
    extauth's x-ccr-capture before hygiene drops it, and the reply as the client gets it (after the
    adapter's translation). None at all unless audit.bodies names someone. The Messages and failover
    clusters need none: their usage meter (router/meter.lua) captures, at no extra filter."""
    if not config.audit.bodies:
        return []
    return [{"name": "ccr.capture", "typed_config": {
        "@type": _LUA, "default_source_code": {"inline_string": CAPTURE_LUA.read_text()}}}]
