"""Provider credentials are sealed: Envoy alone holds them (read from a 0600 SDS file), no
process of the gateway has them in its environment, and only Envoy can reach the adapter.

The adapter runs for real (`python -m router.adapter`) with a run PKI as `ccr up` issues
it; callers try every way in short of holding Envoy's run identity.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from ccr.contract import ID_ADAPTER, ID_ENVOY
from ccr.pki import RunPki, issue_run_pki, uri_sans
from ccr.procs import StartError
from ccr.runtime import Runtime
from ccr.service import client_credentials
from ccr.supervisor import EMULATOR_KEY_ENV, Gateway
from tests.harness import gateway_config, running_service
from tests.test_adapter import request_headers

IPAddress = IPv4Address | IPv6Address
SEALED_ENV = "CCR_TEST_SEALED_PROVIDER_KEY"
SECRET = "sk-ant-sealed-provider-key-7f3c1e"
CONFIG = f"""
version: 1
providers:
  - name: anthropic
    api_key_env: {SEALED_ENV}
models:
  - match: "claude-*"
    provider: anthropic
"""


@dataclass
class Sealed:
    address: str
    pki: RunPki
    log: Path


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sealed]:
    d = tmp_path_factory.mktemp("sealed")
    with running_service("router.adapter", d, CONFIG, env={SEALED_ENV: SECRET}) as child:
        pki = Runtime.load(d / "runtime.json").mtls
        assert pki is not None
        yield Sealed(str(child.info["address"]), pki, child.log_path)


def ask_for_credential(channel: grpc.Channel) -> pb.ProcessingResponse:
    """What an attacker does: one request_headers message; the reply carries the x-api-key mutation."""
    stub = pb_grpc.ExternalProcessorStub(channel)
    replies = stub.Process(iter([request_headers()]), metadata=[("x-ccr-provider", "anthropic")], timeout=10)
    return next(replies)


def refused(channel: grpc.Channel) -> grpc.RpcError:
    with channel, pytest.raises(grpc.RpcError) as e:
        reply = ask_for_credential(channel)
        assert SECRET.encode() not in reply.SerializeToString(), "the provider credential leaked"
    return e.value


def _ca(pki: RunPki) -> bytes:
    return Path(pki.ca).read_bytes()


def test_envoy_identity_is_served_and_gets_no_credential(sealed: Sealed) -> None:
    """The control: Envoy's run identity is served (so the refusals below are about identity).
    Even with a provider key in its environment, the adapter hands out none: Envoy injects it."""
    with grpc.secure_channel(sealed.address, client_credentials(sealed.pki, ID_ENVOY)) as ch:
        reply = ask_for_credential(ch)
    keys = {o.header.key: o.header.raw_value for o in reply.request_headers.response.header_mutation.set_headers}
    assert keys == {"accept-encoding": b"identity"}
    assert SECRET.encode() not in reply.SerializeToString()


def test_plaintext_call_is_refused(sealed: Sealed) -> None:
    err = refused(grpc.insecure_channel(sealed.address))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_without_a_client_certificate_is_refused(sealed: Sealed) -> None:
    err = refused(grpc.secure_channel(sealed.address, grpc.ssl_channel_credentials(_ca(sealed.pki))))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_envoy_id_from_another_ca_is_refused(sealed: Sealed, tmp_path: Path) -> None:
    """Same SPIFFE ID, same trust domain name, but not this run's CA: the handshake fails."""
    forged = issue_run_pki(tmp_path / "forged", [ID_ENVOY])
    me = forged.identity(ID_ENVOY)
    assert uri_sans(Path(me.cert).read_bytes()) == [sealed.pki.identity(ID_ENVOY).spiffe_id]
    creds = grpc.ssl_channel_credentials(_ca(sealed.pki), Path(me.key).read_bytes(), Path(me.cert).read_bytes())
    err = refused(grpc.secure_channel(sealed.address, creds))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_run_certificate_with_another_identity_is_refused(sealed: Sealed) -> None:
    """A certificate from this run's CA, but for another process (extauth): TLS succeeds, the call doesn't."""
    err = refused(grpc.secure_channel(sealed.address, client_credentials(sealed.pki, "extauth")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://ccr.local/extauth" in (err.details() or "")
    assert "refused a call" in sealed.log.read_text()


def test_adapter_will_not_serve_without_a_run_pki(tmp_path: Path) -> None:
    with pytest.raises(StartError, match="serves only mutual TLS"), \
            running_service("router.adapter", tmp_path, CONFIG, env={SEALED_ENV: SECRET}, mtls=None):
        pass


def test_run_pki_files_are_private(tmp_path: Path) -> None:
    pki = issue_run_pki(tmp_path / "pki", [ID_ENVOY, ID_ADAPTER])
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    for ident in pki.identities.values():
        assert stat.S_IMODE(Path(ident.key).stat().st_mode) == 0o600
        assert uri_sans(Path(ident.cert).read_bytes()) == [ident.spiffe_id]
    assert pki.identity(ID_ADAPTER).spiffe_id == "spiffe://ccr.local/adapter"
    # Re-issuing replaces everything: a new CA, so old certificates stop being trusted.
    old_ca = Path(pki.ca).read_bytes()
    assert Path(issue_run_pki(tmp_path / "pki", [ID_ENVOY]).ca).read_bytes() != old_ca


# -- a whole gateway: who holds which secret, where the stores listen -------------------------

DIRECT_ENV = "CCR_TEST_DIRECT_PROVIDER_KEY"
DIRECT_SECRET = "sk-ant-direct-provider-key-91ab2d"
# Set in the test process too; the config names this variable only for the emulated
# provider, so no child may ever see it.
UNUSED_SECRET = "sk-ant-operator-shell-key-5d0c44"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _descendants(pid: int) -> set[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _listening(pid: int) -> set[tuple[IPAddress, int]]:
    """(address, port) of the TCP sockets `pid` listens on, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            hexip, hexport = f[1].split(":")
            # The kernel prints each 32-bit word in host (little-endian) byte order.
            raw = b"".join(bytes.fromhex(hexip[i:i + 8])[::-1] for i in range(0, len(hexip), 8))
            out.add((ipaddress.ip_address(raw), int(hexport, 16)))
    return out


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("sealed-gw")
    path = gateway_config(tmp)
    cfg = yaml.safe_load(path.read_text())
    # Decision services on every interface; the embedded stores must stay on loopback anyway.
    cfg["services"] = {"bind_host": "0.0.0.0"}
    # A real (non-emulated) provider with its credential in the environment; nothing routes
    # to it, so its endpoint is never called.
    cfg["providers"].append({"name": "direct", "endpoint": "http://127.0.0.1:9", "api_key_env": DIRECT_ENV})
    path.write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DIRECT_ENV, DIRECT_SECRET)
        mp.setenv(cfg["providers"][0]["api_key_env"], UNUSED_SECRET)
        g = Gateway(path).start()
    try:
        g.issue_local_key()
        yield g
    finally:
        g.stop()


def test_credentials_reach_no_gateway_process_environment(gw: Gateway) -> None:
    by_name = {c.name: c for c in gw.children}
    assert {"postgres", "redis", "emulator", "extauth", "ratelimit", "adapter", "accesslog", "router",
            "envoy"} <= set(by_name)
    assert gw.emulator_key
    seen: dict[str, set[str]] = {DIRECT_SECRET: set(), UNUSED_SECRET: set(), gw.emulator_key: set()}
    checked = 0
    for child in gw.children:
        for pid in {child.pid} | _descendants(child.pid):
            try:
                raw = Path(f"/proc/{pid}/environ").read_bytes()
            except (ProcessLookupError, FileNotFoundError):
                # A short-lived descendant (a PostgreSQL backend or autovacuum worker) ended after it
                # was listed: nothing left to hold a secret. The child itself must be readable.
                assert pid != child.pid, f"{child.name} ({pid}) is gone"
                continue
            checked += 1
            # Every child shows its real (minimal) environment; PostgreSQL's workers reuse the
            # area for their process title (they are forks of the postmaster, checked here).
            if pid == child.pid:
                assert "PATH" in _environ(pid), f"{child.name} ({pid}): environ unreadable, the check would be void"
            for secret, holders in seen.items():
                if secret.encode() in raw:
                    holders.add(child.name)
    assert checked > len(gw.children)  # postgres workers were checked too
    assert seen[DIRECT_SECRET] == set()
    assert seen[gw.emulator_key] == {"emulator"}  # the provider's own
    assert seen[UNUSED_SECRET] == set()
    assert EMULATOR_KEY_ENV not in _environ(by_name["adapter"].pid)
    # Envoy reads each provider's credential from its run file, 0600 (the emulated provider's is
    # the emulator's key; the overridden variable's value is used nowhere).
    assert gw.runtime is not None
    files = {name: Path(p).read_text() for name, p in gw.runtime.provider_credentials.items()}
    assert set(files) == {"anthropic", "direct"}
    assert DIRECT_SECRET in files["direct"] and gw.emulator_key in files["anthropic"]
    assert all(UNUSED_SECRET not in text for text in files.values())
    assert all(stat.S_IMODE(Path(p).stat().st_mode) == 0o600 for p in gw.runtime.provider_credentials.values())


def test_only_the_named_provider_is_emulated_and_the_gateway_serves(gw: Gateway) -> None:
    assert gw.runtime is not None
    assert set(gw.runtime.upstream_overrides) == {"anthropic"}
    r = httpx.post(f"{gw.url}/v1/messages", timeout=30,
                   json={"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
                   headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text


def test_embedded_stores_listen_on_loopback_only(gw: Gateway) -> None:
    by_name = {c.name: c for c in gw.children}
    for name in ("postgres", "redis"):
        addrs = _listening(by_name[name].pid)
        assert addrs, f"{name} listens on nothing?"
        assert all(ip == ipaddress.ip_address("127.0.0.1") for ip, _ in addrs), (name, addrs)
    # The control: the decision services did take bind_host 0.0.0.0 (grpc binds it dual-stack, [::]).
    extauth = _listening(by_name["extauth"].pid)
    assert extauth and all(ip.is_unspecified for ip, _ in extauth), extauth


def test_runtime_file_and_run_dir_are_private(gw: Gateway) -> None:
    assert gw.runtime is not None and gw.runtime.spiffe_socket is not None and gw.spire is not None
    run = Path(gw.runtime.run_dir)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert stat.S_IMODE((run / "runtime.json").stat().st_mode) == 0o600
    # SPIFFE (the default): SPIRE's config, data and sockets are the run's alone, and no SVID's
    # private key is on disk (KeyManager "memory"; each service keeps its own in memory).
    assert stat.S_IMODE(gw.spire.base.stat().st_mode) == 0o700
    small = [p for p in run.rglob("*") if p.is_file() and "spiffe-workloads" not in p.parts
             and p.stat().st_size < 1 << 20]
    assert small and not [p for p in small if b"PRIVATE KEY" in p.read_bytes()]
    text = (run / "runtime.json").read_text()
    assert DIRECT_SECRET not in text and UNUSED_SECRET not in text
