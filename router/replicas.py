"""Clusters of replicated services (`ccr serve`): their endpoints, health checks and outlier ejection.

Shared by the gRPC services' clusters (router/resources.py) and extauth's HTTP front's (router/authz_http.py).
"""

from __future__ import annotations

import ipaddress
from typing import Any

Json = dict[str, Any]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def lb_endpoints(addresses: list[str]) -> tuple[str, list[Json]]:
    """The cluster type and endpoints for host:port `addresses`: STATIC when all are IPs, else
    STRICT_DNS (Envoy re-resolves the names, so replicas behind one name come and go)."""
    eps = []
    for address in addresses:
        host, port = host_port(address)
        eps.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}})
    return ("STATIC" if all(is_ip(host_port(a)[0]) for a in addresses) else "STRICT_DNS"), eps


def replica_checks(cluster: Json, check: Json | None = None) -> None:
    """Services with replicas (`ccr serve`): ask each one's grpc.health.v1 (or `check`, e.g. extauth's
    HTTP front's http_health_check) and eject one that stops answering or fails calls, so a stopped or
    draining replica gets no new work."""
    cluster["health_checks"] = [{
        "timeout": "1s", "interval": "1s", "no_traffic_interval": "2s",
        "unhealthy_threshold": 1, "healthy_threshold": 1,
        **(check or {"grpc_health_check": {"service_name": ""}}),
    }]
    cluster["outlier_detection"] = {
        "split_external_local_origin_errors": True, "consecutive_local_origin_failure": 1,
        "consecutive_gateway_failure": 2, "base_ejection_time": "5s",
        # A slow answer (a timed-out call) is a guess that the replica is gone, not proof: never
        # eject more than half, so the last replica standing keeps its traffic.
        "max_ejection_percent": 50,
    }
    # Below half healthy, Envoy routes to every replica ("panic") instead of to none: when the
    # last live replica misses one health check (a 1 s timeout on a loaded host), calls still
    # reach it (and a dead one refuses fast, retried on another). With a threshold of 0 that
    # one missed check made every decision call fail with "no healthy upstream" until the next
    # check passed (tests/test_standalone.py: the stalled last replica).
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 50}}
    # When a replica dies, every call in flight to it is retried at once: Envoy's default of 3
    # concurrent retries per cluster would turn the rest into 503s.
    cluster["circuit_breakers"] = {"thresholds": [{"max_retries": 10_000}]}
