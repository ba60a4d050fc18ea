"""Envoy's overload manager for the bootstrap: a heap ceiling and a client connection ceiling.

Envoy holds request bodies in memory (ext_authz buffers a whole body for the policy
decision), so memory is the resource a flood exhausts first. As the heap nears
`gateway.overload.max_heap_bytes` Envoy, in this order: returns free memory to the OS,
resets the streams holding the most buffered bytes (largest first), and finally stops
accepting new requests and connections until pressure drops.
"""

from __future__ import annotations

from typing import Any

from ccr.config import OverloadSettings

T = "type.googleapis.com/"
HEAP = "envoy.resource_monitors.fixed_heap"
CONNECTIONS = "envoy.resource_monitors.global_downstream_max_connections"

# Fractions of max_heap_bytes at which each action starts.
SHRINK_HEAP_AT = 0.85
RESET_STREAMS_FROM, RESET_STREAMS_ALL_AT = 0.85, 0.95
STOP_ACCEPTING_AT = 0.95


def _at(value: float) -> dict[str, Any]:
    return {"name": HEAP, "threshold": {"value": value}}


def _action(name: str, trigger: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"envoy.overload_actions.{name}", "triggers": [trigger]}


def overload_manager(s: OverloadSettings) -> dict[str, Any]:
    """The bootstrap's `overload_manager` section."""
    return {
        # Bodies arrive fast on a LAN: sample often (reading tcmalloc's counters is cheap).
        "refresh_interval": "0.1s",
        "resource_monitors": [
            {"name": HEAP, "typed_config": {
                "@type": T + "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                "max_heap_size_bytes": s.max_heap_bytes}},
            # Enforced by the listeners at accept time; needs no action.
            {"name": CONNECTIONS, "typed_config": {
                "@type": T + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": s.max_downstream_connections}},
        ],
        "actions": [
            _action("shrink_heap", _at(SHRINK_HEAP_AT)),
            # Scaled: from RESET_STREAMS_FROM the largest buffers are reset first; at
            # RESET_STREAMS_ALL_AT every stream above the tracking size is.
            _action("reset_high_memory_stream", {"name": HEAP, "scaled": {
                "scaling_threshold": RESET_STREAMS_FROM, "saturation_threshold": RESET_STREAMS_ALL_AT}}),
            _action("stop_accepting_requests", _at(STOP_ACCEPTING_AT)),
            _action("stop_accepting_connections", _at(STOP_ACCEPTING_AT)),
            _action("disable_http_keepalive", _at(STOP_ACCEPTING_AT)),
        ],
        "loadshed_points": [
            # New connections and new requests are refused...
            {"name": "envoy.load_shed_points.tcp_listener_accept", "triggers": [_at(STOP_ACCEPTING_AT)]},
            # ...and connections still sending are cut: the reset action above tracks
            # HTTP/2 streams only, so HTTP/1.1 uploads are stopped here.
            {"name": "envoy.load_shed_points.http1_server_abort_dispatch", "triggers": [_at(STOP_ACCEPTING_AT)]},
            {"name": "envoy.load_shed_points.http2_server_go_away_on_dispatch", "triggers": [_at(STOP_ACCEPTING_AT)]},
        ],
        # Buffer accounting the reset action needs: streams holding at least 2^n bytes are tracked.
        "buffer_factory_config": {
            "minimum_account_to_track_power_of_two": max(10, s.reset_streams_above_bytes.bit_length() - 1)},
    }
