"""Body capture's parts on their own: the config's rules, who is captured (identity only), the
CheckResponse facts, the sealing (AES-GCM bound to the request id and the part), the access-log
entry's reading, and that with no rule configured nothing on the request path changes."""

from __future__ import annotations

import base64
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb

from audit.bodies import (
    KEY_FILE,
    RESPONSE,
    BodyError,
    captured,
    key_id,
    load_or_create_key,
    open_sealed,
    seal,
    sealed_row,
)
from ccr.config import ConfigError, GatewayConfig, load_config, parse_config
from ccr.contract import AUTHZ_BODY_CAPTURE, AUTHZ_NS, CAPTURE_NS, H_CAPTURE
from ccr.credentials import write_secret
from ccr.runtime import Runtime
from extauth.capture import BodyCapture
from extauth.principal import Principal, PrincipalKind
from router import resources

REPO = Path(__file__).resolve().parent.parent


def _config(bodies: list[dict] | None, max_bytes: int | None = None) -> GatewayConfig:
    doc = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    audit = doc.setdefault("audit", {}) or {}
    doc["audit"] = audit
    if bodies is not None:
        audit["bodies"] = bodies
    if max_bytes is not None:
        audit["body_max_bytes"] = max_bytes
    return parse_config(doc)


def _key(pid: str, tenant: str | None) -> Principal:
    return Principal(PrincipalKind.KEY, pid, pid, tenant=tenant, key_id=pid)


def test_a_rule_names_exactly_one_subject() -> None:
    for bad in ([{"retention_days": 3}], [{"principal": "k1", "tenant": "t", "retention_days": 3}],
                [{"tenant": "t", "retention_days": 0}], [{"tenant": "t"}]):
        with pytest.raises(ConfigError):
            _config(bad)


def test_nothing_is_captured_without_a_rule() -> None:
    assert load_config(REPO / "ccr.example.yaml").audit.bodies == []
    assert BodyCapture.from_config(_config(None)) is None


def test_principal_rule_wins_over_its_tenant() -> None:
    cap = BodyCapture.from_config(_config([{"tenant": "acme", "retention_days": 30},
                                           {"principal": "k-legal", "retention_days": 365}]))
    assert cap is not None
    assert cap.retention_days(_key("k-legal", "acme")) == 365
    assert cap.retention_days(_key("k-legal", None)) == 365
    assert cap.retention_days(_key("k-2", "acme")) == 30
    assert cap.retention_days(_key("k-3", "other")) is None
    assert cap.retention_days(_key("acme", None)) is None  # a tenant name is not a principal id
    assert cap.retention_days(None) is None


def test_check_response_carries_the_request_body_and_the_header() -> None:
    cap = BodyCapture.from_config(_config([{"tenant": "acme", "retention_days": 9}], max_bytes=1024))
    assert cap is not None
    body = b'{"prompt": "' + b"y" * 2000 + b'"}'
    resp = pb.CheckResponse()
    cap.apply(resp, body, 9)
    facts = resp.dynamic_metadata.fields[AUTHZ_BODY_CAPTURE].struct_value.fields
    assert base64.b64decode(facts["request"].string_value) == body[:1024]
    assert facts["request_bytes"].number_value == len(body) and facts["request_truncated"].bool_value is True
    assert facts["retention_days"].number_value == 9
    assert [(h.header.key, h.header.value) for h in resp.ok_response.headers] == [(H_CAPTURE, "1024")]


def test_sealed_bodies_are_bound_to_request_and_part(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "audit")
    assert (tmp_path / "audit" / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(tmp_path / "audit") == key  # made once, then read
    nonce, ct = seal(key, "req-1", "request", b"secret prompt")
    assert b"secret prompt" not in ct
    assert open_sealed(key, "req-1", "request", nonce, ct) == b"secret prompt"
    for rid, part, k in (("req-2", "request", key), ("req-1", RESPONSE, key), ("req-1", "request", b"k" * 32)):
        with pytest.raises(BodyError):
            open_sealed(k, rid, part, nonce, ct)
    flipped = bytearray(ct)
    flipped[0] ^= 1
    with pytest.raises(BodyError):
        open_sealed(key, "req-1", "request", nonce, bytes(flipped))


def _entry(request: bytes | None, response: bytes | None) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.request_id = "rid-7"
    e.common_properties.start_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    authz = e.common_properties.metadata.filter_metadata[AUTHZ_NS]
    authz.update({"principal_id": "k1"})
    if request is not None:
        authz.fields[AUTHZ_BODY_CAPTURE].struct_value.update({
            "retention_days": 2, "request": base64.b64encode(request).decode(), "request_bytes": len(request) + 5,
            "request_truncated": True})
    if response is not None:
        e.common_properties.metadata.filter_metadata[CAPTURE_NS].update({
            "max": 100, "response": base64.b64encode(response).decode(), "response_bytes": len(response),
            "response_truncated": False})
    return e


def test_entry_reading() -> None:
    assert captured(_entry(None, None)) is None
    c = captured(_entry(b"req body", b"data: {}\n\n"))
    assert c is not None
    assert (c.request_id, c.request, c.request_bytes, c.request_truncated) == ("rid-7", b"req body", 13, True)
    assert (c.response, c.response_truncated) == (b"data: {}\n\n", False)
    only_request = captured(_entry(b"req", None))  # refused upstream or the client left: request only
    assert only_request is not None and only_request.response is None
    key = b"\x01" * 32
    row = sealed_row(key, c)
    assert row[0] == "rid-7" and row[3] == key_id(key) and (row[2] - row[1]).days == 2
    assert open_sealed(key, "rid-7", RESPONSE, row[8], row[9]) == c.response


def _runtime() -> Runtime:
    cred = str(write_secret(Path(tempfile.mkdtemp()) / "anthropic.json", "anthropic", "sk-ant-test"))
    return Runtime(config_path=str(REPO / "ccr.example.yaml"), run_dir="/tmp", postgres_dsn="postgresql://x",
                   redis_url="redis://x", extauth="127.0.0.1:7001", ratelimit="127.0.0.1:7002",
                   adapter="127.0.0.1:7003", accesslog="127.0.0.1:7004", listen_port=18080,
                   provider_credentials={"anthropic": cred})


def _upstream_filter_names(config: GatewayConfig) -> dict[str, list[str]]:
    out = {}
    for c in resources.clusters(config, _runtime()):
        opts = c.get("typed_extension_protocol_options", {})
        for o in opts.values():
            if "http_filters" in o:
                out[c["name"]] = [f["name"] for f in o["http_filters"]]
    return out


def _meter_sources(config: GatewayConfig) -> list[str]:
    out = []
    for c in resources.clusters(config, _runtime()):
        for o in c.get("typed_extension_protocol_options", {}).values():
            for f in o.get("http_filters", ()):
                src = f["typed_config"].get("default_source_code", {}).get("inline_string", "")
                if f["name"] == "envoy.filters.http.lua" and "M.CAPTURE_NS" in src:
                    out.append(src)
    return out


def test_capture_only_when_configured() -> None:
    """No rule: no capture filter and the meter's capture switched off. Rules: the adapter's clusters
    get the capture filter first, the Messages cluster's meter captures itself (no extra filter)."""
    none = _config(None)
    without = _upstream_filter_names(none)
    assert without and all("ccr.capture" not in names for names in without.values())
    assert _meter_sources(none) and all("\nM.CAPTURE_ENABLED = false\n" in s for s in _meter_sources(none))
    ruled = _config([{"tenant": "acme", "retention_days": 1}])
    with_rule = _upstream_filter_names(ruled)
    assert with_rule.keys() == without.keys()
    p = ruled.providers[0]
    for name, names in with_rule.items():
        if name in (p.objects_cluster, p.translate_cluster):
            assert names[0] == "ccr.capture" and names[1:] == without[name], name
        else:
            assert names == without[name], name
    assert p.objects_cluster in with_rule
    assert _meter_sources(ruled) and all("\nM.CAPTURE_ENABLED = true\n" in s for s in _meter_sources(ruled))
