"""SPIFFE mTLS on every hop of `ccr up`, with a real SPIRE server and agent and the real Envoy.

The gateway runs with a short SVID TTL so the agent rotates every SVID during the module; the
rotation test waits for the serials to change (not for a time) while requests keep flowing.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ccr.pki import issue_run_pki
from ccr.supervisor import Gateway
from tests.harness import log_row, running_gateway

SVID_TTL_S = 60  # the agent renews at half of it
MODEL = "claude-haiku-4-5"
HELLO = [{"role": "user", "content": "hello"}]
TOKEN_RULE = {"name": "tenant-tokens", "per": "key", "metric": "tokens", "amount": 100_000_000, "unit": "day"}
SERVICE_CLUSTERS = ("ccr_extauth", "ccr_ratelimit", "ccr_adapter", "ccr_accesslog", "ccr_xds")


def hop_clusters(gw: Gateway, clusters: tuple[str, ...]) -> tuple[str, ...]:
    """`clusters` as `gw` calls them: with ext_authz over HTTP (pytest --authz-transport http) extauth's checks
    go to its HTTP front's cluster."""
    assert gw.runtime is not None
    if gw.runtime.config().services.authz_transport != "http":
        return clusters
    return tuple("ccr_extauth_http" if c == "ccr_extauth" else c for c in clusters)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg.setdefault("services", {})["spiffe"] = {"x509_svid_ttl_s": SVID_TTL_S}
        cfg["limits"]["requests_per_minute"] = 100_000  # the rotation test sends as fast as it can
        # A token limit: Envoy then calls the rate limit service at each Messages stream end, so that hop
        # (off the request path with limits.admission: extauth) carries traffic whose mTLS is checked.
        cfg["limits"]["rules"] = [TOKEN_RULE]

    with running_gateway(tmp_path_factory.mktemp("gw-spire"), edit) as g:
        yield g


@pytest.fixture(scope="module")
def client(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)


def addresses(gw: Gateway) -> dict[str, str]:
    rt = gw.runtime
    assert rt is not None
    return {"extauth": str(rt.extauth), "ratelimit": str(rt.ratelimit), "adapter": str(rt.adapter),
            "accesslog": str(rt.accesslog), "router": str(rt.xds)}


class Svid:
    """A chain and key on disk, for clients that are not a registered part."""

    def __init__(self, out: Path, name: str, chain: bytes, key: bytes) -> None:
        self.cert, self.key = out / f"{name}.pem", out / f"{name}.key"
        self.cert.write_bytes(chain)
        self.key.write_bytes(key)
        self.chain_pem, self.key_pem = chain, key


def minted(gw: Gateway, tmp: Path, part: str) -> Svid:
    assert gw.spire is not None
    chain, key = gw.spire.mint_x509(part)
    return Svid(tmp, part.replace("/", "_"), chain, key)


def tls_context(gw: Gateway, svid: Svid | None) -> ssl.SSLContext:
    assert gw.spire is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # an X.509-SVID names a SPIFFE ID (URI SAN), not a host
    ctx.load_verify_locations(cafile=str(gw.spire.bundle_pem))
    if svid is not None:
        ctx.load_cert_chain(str(svid.cert), str(svid.key))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def handshake(gw: Gateway, address: str, svid: Svid | None) -> tuple[x509.Certificate, bytes]:
    """(the server's leaf, the first bytes it sends): an HTTP/2 SETTINGS frame when it accepted us.

    With TLS 1.3 the server checks the client certificate after the client's side of the handshake
    is done, so a refusal shows up on the first read."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            tls_context(gw, svid).wrap_socket(raw) as conn:
        leaf = x509.load_der_x509_certificate(conn.getpeercert(binary_form=True) or b"")
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        return leaf, conn.recv(9)


def uri_of(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def envoy_stats(gw: Gateway) -> dict[str, int]:
    with urllib.request.urlopen(gw.admin_url + "/stats?format=json", timeout=5) as r:
        stats = json.loads(r.read())["stats"]
    return {s["name"]: s["value"] for s in stats if isinstance(s.get("value"), int)}


def envoy_svid_serials(gw: Gateway) -> set[str]:
    with urllib.request.urlopen(gw.admin_url + "/certs", timeout=5) as r:
        certs = json.loads(r.read())["certificates"]
    return {c["serial_number"] for entry in certs for c in entry.get("cert_chain", [])
            if any(s.get("uri") == "spiffe://ccr.local/envoy" for s in c.get("subject_alt_names", []))}


def stats_once_handshaken(gw: Gateway, clusters: tuple[str, ...] | list[str], within_s: float = 15) -> dict:
    """Envoy's stats once every cluster has completed a TLS handshake, or at `within_s` (the caller asserts).
    The rate limit service is called at a stream's end, which may come after the client has its reply and
    after the audit row is written: its hop's first handshake may trail both."""
    deadline = time.monotonic() + within_s
    while True:
        stats = envoy_stats(gw)
        if all(stats.get(f"cluster.{c}.ssl.handshake", 0) >= 1 for c in clusters) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_sdk_requests_cross_mtls_on_every_hop(gw: Gateway, client: anthropic.Anthropic) -> None:
    before = envoy_stats(gw)
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=16, messages=HELLO)
    assert raw.parse().content
    with client.messages.stream(model=MODEL, max_tokens=16, messages=HELLO) as stream:
        assert stream.get_final_text()
    client.messages.batches.list()  # Batches go through the adapter (ext_proc on the objects cluster)
    assert gw.runtime is not None
    # The access-log receiver (mTLS only) wrote the request's row: Envoy's log stream reached it.
    assert log_row(gw.runtime.postgres_dsn, raw.headers["x-request-id"])["status"] == 200
    hops = hop_clusters(gw, SERVICE_CLUSTERS)
    stats = stats_once_handshaken(gw, hops)
    for cluster in hops:
        # Each hop completed TLS handshakes and never fell back to anything else.
        assert stats[f"cluster.{cluster}.ssl.handshake"] >= 1, cluster
        assert stats.get(f"cluster.{cluster}.ssl.connection_error", 0) == before.get(
            f"cluster.{cluster}.ssl.connection_error", 0), cluster
    # Envoy's own SVID came from the agent over SDS.
    assert envoy_svid_serials(gw)


@pytest.mark.parametrize("service", ["extauth", "ratelimit", "adapter", "accesslog", "router"])
def test_each_service_presents_its_own_spiffe_id(gw: Gateway, tmp_path: Path, service: str) -> None:
    probe = minted(gw, tmp_path, "test/probe")
    leaf, first = handshake(gw, addresses(gw)[service], probe)
    assert uri_of(leaf) == [f"spiffe://ccr.local/{service}"]
    assert first[3:4] == b"\x04"  # accepted: the server's SETTINGS frame


def refusals(gw: Gateway, service: str, reason: str) -> float:
    """ccr_mtls_refusals_total{service, reason}, summed over the service's worker processes."""
    assert gw.runtime is not None
    total = 0.0
    pattern = re.compile(rf'^ccr_mtls_refusals_total{{reason="{reason}",service="{service}"}} (\S+)$', re.M)
    for name, address in gw.runtime.metrics.items():
        if name == service or name.startswith(service + "."):
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
                total += sum(float(v) for v in pattern.findall(r.read().decode()))
    return total


def service_log(gw: Gateway, service: str) -> str:
    assert gw.runtime is not None
    return "".join(p.read_text(errors="replace") for p in (Path(gw.runtime.run_dir) / "logs").glob(f"{service}*.log"))


def wait_counted(gw: Gateway, service: str, reason: str, before: float) -> None:
    """The refusal is counted by the service's reader of gRPC core's report, a moment after the
    client saw it: wait for that count (bounded), not for a time."""
    deadline = time.monotonic() + 10
    while refusals(gw, service, reason) <= before:
        assert time.monotonic() < deadline, f"{service}: no {reason} refusal counted"
        time.sleep(0.05)
    assert re.search(rf"refused a TLS connection to {service}: {reason} \(", service_log(gw, service))


def gateway_still_serves(client: anthropic.Anthropic) -> None:
    assert client.messages.create(model=MODEL, max_tokens=8, messages=HELLO).content


@pytest.mark.parametrize("service", ["extauth", "ratelimit", "adapter", "accesslog", "router"])
def test_plaintext_connection_is_refused(gw: Gateway, client: anthropic.Anthropic, service: str) -> None:
    before = refusals(gw, service, "plaintext")
    with grpc.insecure_channel(addresses(gw)[service]) as ch, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_counted(gw, service, "plaintext", before)
    gateway_still_serves(client)


@pytest.mark.parametrize("trust_domain", ["ccr.local", "evil.example"])
def test_certificate_from_another_ca_is_refused(gw: Gateway, client: anthropic.Anthropic, tmp_path: Path,
                                                trust_domain: str) -> None:
    # Same SPIFFE ID as Envoy (or another trust domain's), but not issued by the run's SPIRE.
    pki = issue_run_pki(tmp_path / "rogue", ["envoy"], trust_domain=trust_domain)
    ident = pki.identity("envoy")
    rogue = Svid(tmp_path, "rogue", Path(ident.cert).read_bytes(), Path(ident.key).read_bytes())
    before = refusals(gw, "adapter", "untrusted_certificate")
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _, first = handshake(gw, addresses(gw)["adapter"], rogue)
        if not first:
            raise ConnectionResetError("closed")
    wait_counted(gw, "adapter", "untrusted_certificate", before)
    gateway_still_serves(client)


def test_no_client_certificate_is_refused(gw: Gateway, client: anthropic.Anthropic) -> None:
    before = refusals(gw, "adapter", "no_client_certificate")
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _, first = handshake(gw, addresses(gw)["adapter"], None)
        if not first:
            raise ConnectionResetError("closed")
    wait_counted(gw, "adapter", "no_client_certificate", before)
    gateway_still_serves(client)


def test_expired_svid_is_refused(gw: Gateway, client: anthropic.Anthropic, tmp_path: Path) -> None:
    """Envoy's own SPIFFE ID from the run's own SPIRE, but expired. The services verify with the real
    clock (BoringSSL), so the SVID is minted with a 1 s TTL and the test waits for its notAfter."""
    assert gw.spire is not None
    chain, key = gw.spire.mint_x509("envoy", ttl_s=1)
    expired = Svid(tmp_path, "expired", chain, key)
    not_after = x509.load_pem_x509_certificate(chain).not_valid_after_utc.timestamp()
    while time.time() <= not_after + 1:  # the condition itself: the certificate's end of validity
        time.sleep(0.1)
    for service in ("adapter", "extauth"):
        before = refusals(gw, service, "expired_certificate")
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            _, first = handshake(gw, addresses(gw)[service], expired)
            if not first:
                raise ConnectionResetError("closed")
        wait_counted(gw, service, "expired_certificate", before)
    gateway_still_serves(client)


def grpc_health_as(gw: Gateway, svid: Svid, address: str) -> tuple[int, str]:
    """grpc.health.v1 Check over HTTP/2 on our own TLS socket: (grpc-status, grpc-message).

    grpcio's client insists on a DNS/IP SAN matching the host; an X.509-SVID has only its SPIFFE
    ID, so this client checks the chain (the run's bundle) and leaves the name to the test."""
    host, _, port = address.rpartition(":")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    body = health_pb2.HealthCheckRequest().SerializeToString()
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            tls_context(gw, svid).wrap_socket(raw) as sock:
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", address),
                              (":path", "/grpc.health.v1.Health/Check"), ("content-type", "application/grpc"),
                              ("te", "trailers")])
        conn.send_data(1, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
        sock.sendall(conn.data_to_send())
        fields: dict[str, str] = {}
        while True:
            data = sock.recv(65536)
            assert data, "connection closed before the call ended"
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    fields.update(dict(event.headers))
                if isinstance(event, h2.events.StreamEnded):
                    return int(fields["grpc-status"]), fields.get("grpc-message", "")
            sock.sendall(conn.data_to_send())


@pytest.mark.parametrize(("caller", "service"), [("ratelimit", "adapter"), ("ratelimit", "extauth"),
                                                  ("extauth", "router"), ("adapter", "accesslog"),
                                                  ("accesslog", "extauth"), ("router", "ratelimit")])
def test_a_part_with_the_wrong_spiffe_id_is_refused(gw: Gateway, client: anthropic.Anthropic, tmp_path: Path,
                                                   caller: str, service: str) -> None:
    svid = minted(gw, tmp_path, caller)
    status, message = grpc_health_as(gw, svid, addresses(gw)[service])
    assert status == grpc.StatusCode.PERMISSION_DENIED.value[0], message
    log = (Path(gw.runtime.run_dir) / "logs" / f"{service}.log").read_text()  # type: ignore[union-attr]
    assert re.search(rf"refused a call from .* \(peer identity spiffe://ccr.local/{caller};", log)
    assert gw.runtime is not None
    if service == "extauth":
        with urllib.request.urlopen(f"http://{gw.runtime.metrics[service]}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert f'ccr_mtls_peer_refusals_total{{peer="spiffe://ccr.local/{caller}"}} 1.0' in text, text
    # Every service counts it by reason (the refusing worker process's own /metrics).
    assert refusals(gw, service, "wrong_spiffe_id") >= 1
    gateway_still_serves(client)


def test_envoy_identity_is_accepted(gw: Gateway, tmp_path: Path) -> None:
    """The other side of the refusals above: the same call with Envoy's SPIFFE ID goes through."""
    svid = minted(gw, tmp_path, "envoy")
    for service in ("adapter", "router", "ratelimit"):
        assert grpc_health_as(gw, svid, addresses(gw)[service]) == (grpc.StatusCode.OK.value[0], ""), service


def test_svid_rotation_mid_run_breaks_no_request(gw: Gateway, client: anthropic.Anthropic, tmp_path: Path) -> None:
    probe = minted(gw, tmp_path, "test/probe")
    served = {name: handshake(gw, addr, probe)[0].serial_number for name, addr in addresses(gw).items()}
    envoy_before = envoy_svid_serials(gw)
    errors_before = {c: envoy_stats(gw).get(f"cluster.{c}.ssl.connection_error", 0) for c in SERVICE_CLUSTERS}
    deadline = time.monotonic() + 4 * SVID_TTL_S
    sent = 0
    rotated: set[str] = set()
    while rotated != set(served) | {"envoy"}:
        assert time.monotonic() < deadline, f"only {sorted(rotated)} rotated their SVIDs"
        # Every request succeeds while SVIDs change under it (raises otherwise).
        assert client.messages.create(model=MODEL, max_tokens=8, messages=HELLO).content
        sent += 1
        for name, addr in addresses(gw).items():
            if handshake(gw, addr, probe)[0].serial_number != served[name]:
                rotated.add(name)
        if envoy_svid_serials(gw) - envoy_before:
            rotated.add("envoy")
    assert sent >= 1
    # And after the rotation.
    for _ in range(3):
        assert client.messages.create(model=MODEL, max_tokens=8, messages=HELLO).content
    stats = envoy_stats(gw)
    assert {c: stats.get(f"cluster.{c}.ssl.connection_error", 0) for c in SERVICE_CLUSTERS} == errors_before


def test_envoy_accepts_only_each_services_own_spiffe_id(tmp_path: Path) -> None:
    """Envoy's side of the trust model, in the config it is given: every service cluster and the ADS
    cluster present Envoy's SVID and require the exact SPIFFE ID of the service behind them."""
    import subprocess

    from ccr.config import load_config
    from ccr.credentials import write_secret
    from ccr.runtime import Runtime
    from ccr.supervisor import envoy_binary, render_bootstrap
    from router import resources

    repo = Path(__file__).resolve().parent.parent
    cred = write_secret(tmp_path / "anthropic.json", "anthropic", "sk-ant-test")
    rt = Runtime(config_path=str(repo / "ccr.example.yaml"), run_dir=str(tmp_path), postgres_dsn="postgresql://x",
                 redis_url="redis://x", extauth="127.0.0.1:7001", ratelimit="127.0.0.1:7002",
                 adapter="127.0.0.1:7003", accesslog="127.0.0.1:7004", listen_port=18080,
                 provider_credentials={"anthropic": str(cred)}, spiffe_socket="/run/agent.sock",
                 spiffe_trust_domain="ccr.local")

    def expected(tls: dict[str, Any]) -> tuple[str, str, str]:
        common = tls["typed_config"]["common_tls_context"]
        ctx = common["combined_validation_context"]
        return (common["tls_certificate_sds_secret_configs"][0]["name"],
                ctx["validation_context_sds_secret_config"]["name"],
                ctx["default_validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"])

    by_name = {c["name"]: c for c in resources.clusters(load_config(repo / "ccr.example.yaml"), rt)}
    for cluster, part in resources.SERVICE_IDENTITY.items():
        assert expected(by_name[cluster]["transport_socket"]) == (
            "spiffe://ccr.local/envoy", "spiffe://ccr.local", f"spiffe://ccr.local/{part}")
    text = render_bootstrap("ccr-test", "127.0.0.1", 0, "127.0.0.1:7005", spiffe=("/run/agent.sock", "ccr.local"))
    boot = json.loads(text)
    xds, agent = boot["static_resources"]["clusters"]
    assert expected(xds["transport_socket"]) == ("spiffe://ccr.local/envoy", "spiffe://ccr.local",
                                                 "spiffe://ccr.local/router")
    assert agent["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "pipe": {"path": "/run/agent.sock"}}
    f = tmp_path / "bootstrap.json"
    f.write_text(text)
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f), "--disable-hot-restart"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-4000:]


def test_a_gateway_on_an_existing_spire_agent(gw: Gateway, tmp_path: Path) -> None:
    """services.spiffe.agent_socket: no SPIRE of its own; SVIDs from the agent given (here the module
    gateway's), for the entries its operator created (here: the second gateway's workload paths)."""
    from ccr.contract import ID_ENVOY, SPIFFE_PARTS
    from ccr.spire import WORKLOADS_DIR
    from ccr.supervisor import envoy_binary

    assert gw.spire is not None
    root = tmp_path / "data" / "run" / WORKLOADS_DIR
    paths = {p: root / p / "bin" / ("python" if p != ID_ENVOY else Path(envoy_binary()).name) for p in SPIFFE_PARTS}
    gw.spire.register(paths)

    def edit(cfg: dict[str, Any]) -> None:
        cfg.setdefault("services", {})["spiffe"] = {"agent_socket": str(gw.spire.agent_socket)}  # type: ignore[union-attr]
        cfg["limits"]["rules"] = [TOKEN_RULE]  # the rate limit service's hop carries the stream-end charge

    with running_gateway(tmp_path, edit) as other:
        assert other.spire is None and not any(c.name.startswith("spire") for c in other.children)
        assert other.runtime is not None and other.runtime.spiffe_socket == str(gw.spire.agent_socket)
        client = anthropic.Anthropic(base_url=other.url, api_key=other.api_key, max_retries=0)
        assert client.messages.create(model=MODEL, max_tokens=8, messages=HELLO).content
        hops = hop_clusters(other, ("ccr_extauth", "ccr_ratelimit", "ccr_xds"))
        stats = stats_once_handshaken(other, hops)
        assert all(stats[f"cluster.{c}.ssl.handshake"] >= 1 for c in hops), {c: stats.get(f"cluster.{c}.ssl.handshake")
                                                                           for c in hops}
