"""SPIFFE workloads through the real gateway: Envoy terminates mTLS on the listener,
verifies the client's X.509 SVID against the trust bundle, and hands its URI SAN to
extauth as `source.principal`; the emulator is the upstream."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests import pki
from tests.harness import emulator_mark, log_row, running_gateway

BATCH = "spiffe://example.org/ns/batch/sa/job"
WEB = "spiffe://example.org/ns/web/sa/api"
HELLO = [{"role": "user", "content": "hello"}]


class Certs:
    def __init__(self, out: Path) -> None:
        self.out = out
        example = pki.make_ca(out, "example-org-ca")
        other = pki.make_ca(out, "other-org-ca")
        self.rogue_ca = pki.make_ca(out, "rogue-ca")  # not in the gateway's bundle
        # The listener trusts both CAs (a federated bundle); only example.org is a trusted trust domain.
        self.bundle = pki.bundle(out, "client-bundle.pem", example, other)
        self.server_ca = pki.make_ca(out, "server-ca")
        self.server = pki.issue(self.server_ca, out, "gateway", dns=("localhost",), ips=("127.0.0.1",), server=True)
        self.batch = pki.issue(example, out, "batch", uris=(BATCH,))
        self.web = pki.issue(example, out, "web", uris=(WEB,))
        self.foreign = pki.issue(other, out, "foreign", uris=("spiffe://other.org/ns/batch/sa/job",))
        self.dns_only = pki.issue(example, out, "dns-only", dns=("job.example.org",))
        self.two_ids = pki.issue(example, out, "two-ids", uris=(BATCH, "spiffe://example.org/ns/admin/sa/root"))
        self.rogue = pki.issue(self.rogue_ca, out, "rogue", uris=(BATCH,))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Gateway]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["tls"] = {"cert_file": str(certs.server.cert_file), "key_file": str(certs.server.key_file),
                                 "client_ca_file": str(certs.bundle), "require_client_cert": True}
        cfg["identity"] = {"spiffe": {"enabled": True, "trust_domains": ["example.org"], "allow_without_key": True}}

    with running_gateway(tmp_path_factory.mktemp("gw-mtls"), edit, local_key=False) as g:
        yield g


def tls_client(certs: Certs, cert: pki.Issued | None, **kw: Any) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(certs.server_ca.cert_file))
    if cert is not None:
        ctx.load_cert_chain(cert.cert_file, cert.key_file)
    return httpx.Client(verify=ctx, timeout=30, **kw)


def body(model: str) -> bytes:
    return json.dumps({"model": model, "max_tokens": 16, "messages": HELLO}).encode()


def post(gw: Gateway, client: httpx.Client, model: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(f"{gw.url}/v1/messages", content=body(model),
                       headers={"anthropic-version": "2023-06-01", "content-type": "application/json",
                                **(headers or {})})


def test_gateway_url_is_https(gw: Gateway) -> None:
    assert gw.url.startswith("https://127.0.0.1:")


def test_workload_without_key_reaches_the_emulator(gw: Gateway, certs: Certs) -> None:
    mark = emulator_mark(gw)
    with tls_client(certs, certs.batch) as c:
        r = post(gw, c, "claude-haiku-4-5")
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "message" and r.json()["content"][0]["text"]
    [rec] = mark.arrived()
    assert rec["body_sha256"] == hashlib.sha256(body("claude-haiku-4-5")).hexdigest()
    # The access log names the workload: Envoy passed the SVID's URI SAN to extauth.
    assert gw.runtime is not None
    row = log_row(gw.runtime.postgres_dsn, r.headers["x-request-id"])
    assert row["principal"] == BATCH and row["key_id"] is None and row["status"] == 200


@pytest.mark.parametrize(("offered", "chosen"), [(["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")])
def test_alpn_offers_h2_and_http11(gw: Gateway, certs: Certs, offered: list[str], chosen: str) -> None:
    ctx = ssl.create_default_context(cafile=str(certs.server_ca.cert_file))
    ctx.load_cert_chain(certs.batch.cert_file, certs.batch.key_file)
    ctx.set_alpn_protocols(offered)
    host, port = gw.url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.selected_alpn_protocol() == chosen


def test_policy_decides_by_spiffe_id_and_trust_domain(gw: Gateway, certs: Certs) -> None:
    # The batch job may use only its one model, although its trust domain may use any Claude model.
    with tls_client(certs, certs.batch) as c:
        r = post(gw, c, "claude-sonnet-4-5")
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["type"] == "permission_error"
    assert f"workload '{BATCH}'" in err["message"] and "allowed models: claude-haiku-4-5" in err["message"]
    with tls_client(certs, certs.web) as c:
        assert post(gw, c, "claude-sonnet-4-5").status_code == 200


def without_decision(message: str) -> str:
    """A denial's message without the decision id every extauth refusal ends with."""
    m = re.fullmatch(r"(.*) \(decision dec_[0-9a-f]+\)", message, re.S)
    assert m, message
    return m.group(1)


def test_other_trust_domain_is_refused(gw: Gateway, certs: Certs) -> None:
    mark = emulator_mark(gw)
    with tls_client(certs, certs.foreign) as c:
        r = post(gw, c, "claude-haiku-4-5")
    assert r.status_code == 403
    body = r.json()
    body["error"]["message"] = without_decision(body["error"]["message"])
    assert body == {"type": "error", "error": {"type": "permission_error", "message": (
        "workload spiffe://other.org/ns/batch/sa/job: trust domain 'other.org' is not trusted by this gateway "
        "(identity.spiffe.trust_domains)")}}
    assert mark.arrived() == []


def test_certificate_without_spiffe_id_is_refused(gw: Gateway, certs: Certs) -> None:
    with tls_client(certs, certs.dns_only) as c:
        r = post(gw, c, "claude-haiku-4-5")
    assert r.status_code == 401
    err = r.json()["error"]
    err["message"] = without_decision(err["message"])
    assert err == {"type": "authentication_error", "message": (
        "client certificate is not an X.509-SVID: it has 0 URI SANs; an X.509-SVID has exactly one (its SPIFFE ID)")}


def test_certificate_with_two_spiffe_ids_is_refused(gw: Gateway, certs: Certs) -> None:
    # Envoy would report only the first URI SAN; the certificate as a whole is ambiguous.
    with tls_client(certs, certs.two_ids) as c:
        r = post(gw, c, "claude-haiku-4-5")
    assert r.status_code == 401
    assert "it has 2 URI SANs" in r.json()["error"]["message"]


@pytest.mark.parametrize("who", ["none", "rogue"])
def test_handshake_fails_without_a_trusted_client_certificate(gw: Gateway, certs: Certs, who: str) -> None:
    mark = emulator_mark(gw)
    # Envoy's listener counts each refusal by reason (its /stats, and /stats/prometheus as
    # envoy_listener_ssl_fail_verify_*), and it keeps serving.
    stat = "ssl.fail_verify_no_cert" if who == "none" else "ssl.fail_verify_error"
    refused = listener_stat(gw, stat)
    with tls_client(certs, None if who == "none" else certs.rogue) as c, pytest.raises(httpx.TransportError):
        post(gw, c, "claude-haiku-4-5")
    assert mark.arrived() == []
    assert listener_stat(gw, stat) == refused + 1
    with tls_client(certs, certs.batch) as c:
        assert post(gw, c, "claude-haiku-4-5").status_code == 200


def listener_stat(gw: Gateway, suffix: str) -> int:
    port = gw.url.rsplit(":", 1)[1]
    with httpx.Client(timeout=5) as c:
        stats = c.get(f"{gw.admin_url}/stats?format=json").json()["stats"]
    return sum(int(s["value"]) for s in stats
               if "name" in s and s["name"].startswith("listener.") and f"_{port}." in s["name"]
               and s["name"].endswith(suffix))


def test_forged_xfcc_header_does_not_reach_upstream(gw: Gateway, certs: Certs) -> None:
    forged = f"By={WEB};URI=spiffe://example.org/ns/admin"
    mark = emulator_mark(gw)
    with tls_client(certs, certs.batch) as c:
        r = post(gw, c, "claude-haiku-4-5", {"x-forwarded-client-cert": forged})
    assert r.status_code == 200
    [rec] = mark.arrived()
    assert "x-forwarded-client-cert" not in rec["headers"]


def test_key_and_certificate_make_the_key_principal(gw: Gateway, certs: Certs) -> None:
    assert gw.runtime is not None
    rec, key = create_key(gw.runtime.postgres_dsn, "batch-key", ["default"], owner="data", tenant="acme")
    with tls_client(certs, certs.batch) as c:
        # The key's groups decide, not the workload's one-model grant.
        r = post(gw, c, "claude-sonnet-4-5", {"x-api-key": key})
    assert r.status_code == 200, r.text
    row = log_row(gw.runtime.postgres_dsn, r.headers["x-request-id"])
    assert row["key_id"] == rec.id and row["principal"] == "batch-key"


def served_serial(gw: Gateway, certs: Certs) -> int:
    ctx = ssl.create_default_context(cafile=str(certs.server_ca.cert_file))
    ctx.load_cert_chain(certs.batch.cert_file, certs.batch.key_file)
    host, port = gw.url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"").serial_number


def test_listener_certificate_rotates_without_a_restart(gw: Gateway, certs: Certs, tmp_path: Path) -> None:
    """Replacing the listener's certificate and key files (renamed into place) rotates them in the
    running Envoy: new handshakes get the new certificate, a connection already open keeps
    working, and no request fails. (Last in the module: the others only check the CA.)"""
    assert gw.runtime is not None
    uptime = envoy_uptime(gw)
    before = served_serial(gw, certs)
    assert before == certs.server.cert.serial_number
    new = pki.issue(certs.server_ca, tmp_path, "gateway-next", dns=("localhost",), ips=("127.0.0.1",), server=True)
    with tls_client(certs, certs.batch) as open_client:
        assert post(gw, open_client, "claude-haiku-4-5").status_code == 200  # a connection held open
        # As cert-manager or a Kubernetes secret volume does: each file renamed into place.
        os.replace(new.key_file, certs.server.key_file)
        os.replace(new.cert_file, certs.server.cert_file)
        deadline = time.monotonic() + 30
        while (served := served_serial(gw, certs)) != new.cert.serial_number:
            assert served == before, served  # never anything but the old or the new certificate
            assert time.monotonic() < deadline, "the listener still serves the old certificate"
            time.sleep(0.05)
        assert post(gw, open_client, "claude-haiku-4-5").status_code == 200  # the open connection
    with tls_client(certs, certs.batch) as fresh:
        assert post(gw, fresh, "claude-haiku-4-5").status_code == 200
    assert envoy_uptime(gw) >= uptime  # the same Envoy process throughout: no restart


def envoy_uptime(gw: Gateway) -> int:
    with httpx.Client(timeout=5) as c:
        stats = c.get(f"{gw.admin_url}/stats?format=json&filter=^server.uptime$").json()["stats"]
    return int(stats[0]["value"])
