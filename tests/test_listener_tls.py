"""gateway.tls and identity.spiffe: config validation and the listener's TLS context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ccr.config import ConfigError, parse_config
from router import resources
from tests import pki
from tests.test_router import _runtime, _validate

REPO = Path(__file__).resolve().parent.parent


def _cfg(**extra: object) -> dict:
    doc = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    for path, value in extra.items():
        section, field = path.split("__")
        doc.setdefault(section, {})[field] = value
    return doc


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"gateway__tls": {"cert_file": "c", "key_file": "k", "require_client_cert": True}},
         "require_client_cert needs client_ca_file"),
        ({"identity__spiffe": {"enabled": True, "trust_domains": ["example.org"]}},
         "identity.spiffe.enabled needs gateway.tls.client_ca_file"),
        ({"gateway__tls": {"cert_file": "c", "key_file": "k"},
          "identity__spiffe": {"enabled": True, "trust_domains": ["example.org"]}},
         "identity.spiffe.enabled needs gateway.tls.client_ca_file"),
        ({"identity__spiffe": {"trust_domains": ["Example.org"]}}, "identity.spiffe.trust_domains.0"),
        ({"identity__spiffe": {"trust_domains": ["example.org:443"]}}, "identity.spiffe.trust_domains.0"),
        ({"identity__spiffe": {"enabled": "yes please"}}, "identity.spiffe.enabled"),
    ],
)
def test_bad_tls_and_spiffe_settings(extra: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(**extra), "gw.yaml")
    assert needle in str(e.value)


def test_defaults_are_closed() -> None:
    cfg = parse_config(_cfg())
    assert cfg.gateway.tls is None
    assert not cfg.identity.spiffe.enabled and cfg.identity.spiffe.trust_domains == []
    assert not cfg.identity.spiffe.allow_without_key


def test_missing_certificate_file_is_named(tmp_path: Path) -> None:
    cfg = parse_config(_cfg(gateway__tls={"cert_file": "missing.crt", "key_file": "missing.key"}))
    runtime = _runtime().model_copy(update={"config_path": str(tmp_path / "gw.yaml")})
    with pytest.raises(ValueError, match=f"gateway.tls.cert_file: {tmp_path}/missing.crt is not a readable file"):
        resources.build(cfg, runtime, 18080)


@pytest.mark.parametrize("require", [True, False])
def test_mtls_listener_passes_envoy_validate(tmp_path: Path, require: bool) -> None:
    ca = pki.make_ca(tmp_path, "ca")
    server = pki.issue(ca, tmp_path, "server", dns=("localhost",), server=True)
    # Relative names resolve against the config file's directory.
    cfg = parse_config(_cfg(gateway__tls={"cert_file": "server.crt", "key_file": "server.key",
                                          "client_ca_file": str(ca.cert_file), "require_client_cert": require}))
    runtime = _runtime().model_copy(update={"config_path": str(tmp_path / "gw.yaml")})
    doc = resources.static_bootstrap(cfg, runtime, 18080)
    chain = doc["static_resources"]["listeners"][0]["filter_chains"][0]
    ctx = chain["transport_socket"]["typed_config"]
    assert ctx["require_client_certificate"] is require
    assert ctx["common_tls_context"]["alpn_protocols"] == ["h2", "http/1.1"]
    assert ctx["common_tls_context"]["tls_certificates"][0]["certificate_chain"]["filename"] == str(server.cert_file)
    assert ctx["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == str(ca.cert_file)
    assert chain["filters"][0]["typed_config"]["forward_client_cert_details"] == "SANITIZE"
    r = _validate(tmp_path, doc)
    assert r.returncode == 0, r.stderr[-4000:]


def test_plain_listener_has_no_tls() -> None:
    doc = resources.static_bootstrap(parse_config(_cfg()), _runtime(), 18080)
    assert "transport_socket" not in doc["static_resources"]["listeners"][0]["filter_chains"][0]


def test_listener_certificate_from_watched_sds_files_passes_envoy_validate(tmp_path: Path) -> None:
    """With the SDS files the process starting Envoy writes (ccr/listener_tls.py), the listener
    takes its certificate and client CA from them (watched: replacing the PEM files rotates them,
    tests/test_e2e_spiffe.py), and every secret is one Envoy's protos accept."""
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
    from google.protobuf import json_format

    from ccr.listener_tls import CERT_SECRET, CLIENT_CA_SECRET, sds_file, write_listener_sds

    ca = pki.make_ca(tmp_path, "ca")
    server = pki.issue(ca, tmp_path, "server", dns=("localhost",), server=True)
    cfg = parse_config(_cfg(gateway__tls={"cert_file": "server.crt", "key_file": "server.key",
                                          "client_ca_file": str(ca.cert_file), "require_client_cert": True}))
    sds = tmp_path / "sds"
    write_listener_sds(cfg.gateway.tls, tmp_path, sds)  # type: ignore[arg-type]
    runtime = _runtime().model_copy(update={"config_path": str(tmp_path / "gw.yaml"), "listener_sds_dir": str(sds)})
    doc = resources.static_bootstrap(cfg, runtime, 18080)
    common = doc["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"][
        "common_tls_context"]
    assert "tls_certificates" not in common and "validation_context" not in common
    assert common["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]["path"] == str(
        sds_file(sds, CERT_SECRET))
    assert common["validation_context_sds_secret_config"]["name"] == CLIENT_CA_SECRET
    for name in (CERT_SECRET, CLIENT_CA_SECRET):
        (resource,) = json.loads(sds_file(sds, name).read_text())["resources"]
        resource.pop("@type")
        secret = json_format.ParseDict(resource, secret_pb2.Secret())
        assert secret.name == name
    cert = json.loads(sds_file(sds, CERT_SECRET).read_text())["resources"][0]["tls_certificate"]
    assert cert["certificate_chain"]["filename"] == str(server.cert_file)
    assert cert["watched_directory"]["path"] == str(tmp_path)  # cert and key are re-read together
    r = _validate(tmp_path, doc)
    assert r.returncode == 0, r.stderr[-4000:]
