"""`ccr serve`: every part on its own at the addresses the config fixes, replicas included.

Real processes started exactly as a deployment would start them (`ccr -c FILE serve NAME`),
one external PostgreSQL and Redis, the Anthropic emulator standing in for the real API, two
Envoys sharing the listener port. A replica of extauth and of ratelimit is killed (SIGKILL)
mid-run and another drained (SIGTERM); no unstreamed request fails and every request has
exactly one audit row.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import grpc
import psycopg
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ccr.config import ConfigError
from ccr.contract import ID_ENVOY
from ccr.pki import load_pki
from ccr.procs import Child, free_port, spawn, wait_ready_file, wait_until
from ccr.service import client_credentials
from ccr.standalone import serve
from extauth.keys import create_key
from tests.harness import create_database, log_rows

REPO = Path(__file__).resolve().parent.parent
CCR = [sys.executable, "-m", "ccr.cli"]


def _serving(address: str, creds: grpc.ChannelCredentials | None = None) -> bool:
    with (grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return r.status == health_pb2.HealthCheckResponse.SERVING


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback admin
            return r.status == 200
    except OSError:
        return False


def _debug(admins: list[str]) -> str:
    out = [line for u in admins for line in _cluster_hosts(u) if line.startswith("ccr_ratelimit::127")]
    for u in admins:
        with urllib.request.urlopen(u + "/stats?filter=ccr_ratelimit", timeout=5) as r:  # noqa: S310
            out += [x for x in r.read().decode().splitlines() if not x.endswith(": 0")]
        with urllib.request.urlopen(u + "/stats?filter=ratelimit", timeout=5) as r:  # noqa: S310
            out += [x for x in r.read().decode().splitlines() if not x.endswith(": 0") and "ccr_ratelimit" not in x]
    return "\n".join(out)


def _cluster_hosts(admin: str) -> list[str]:
    with urllib.request.urlopen(admin + "/clusters", timeout=5) as r:  # noqa: S310 - loopback admin
        return r.read().decode().splitlines()


def _health_flags(admin: str, cluster: str, address: str) -> str:
    prefix = f"{cluster}::{address}::health_flags::"
    return next((line.removeprefix(prefix) for line in _cluster_hosts(admin) if line.startswith(prefix)), "")


def _active(admin: str, cluster: str, address: str) -> int:
    prefix = f"{cluster}::{address}::rq_active::"
    return next((int(line.removeprefix(prefix)) for line in _cluster_hosts(admin) if line.startswith(prefix)), 0)


def test_serve_says_what_is_missing(tmp_path: Path) -> None:
    cfg = {"providers": [{"name": "anthropic", "emulator": True}], "models": [{"match": "claude-*",
                                                                              "provider": "anthropic"}]}
    path = tmp_path / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="services.standalone is not set"):
        serve("extauth", path)
    port = "127.0.0.1:1"
    cfg["services"] = {"standalone": {n: {"listen": port} for n in
                                      ("extauth", "ratelimit", "adapter", "accesslog", "router")}}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as e:
        serve("extauth", path)
    for problem in ("storage.postgres_dsn is not set", "storage.redis_url is not set", "gateway.listen.port is 0",
                    "nor services.standalone.pki_dir is set", "providers anthropic use `emulator: true`"):
        assert problem in str(e.value)
    # And through the CLI, as a user types it: exit 2 and the same words.
    r = subprocess.run([*CCR, "serve", "router", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "gateway.listen.port is 0" in r.stderr, r.stderr


# What `ccr serve` runs besides Envoy (children named <part> or <part>-<instance>).
STANDALONE_PARTS = ("extauth", "ratelimit", "adapter", "accesslog", "router")


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[Child] = []
        self.logs = tmp / "logs"

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = spawn(name, argv, self.logs, env={**os.environ, **(env or {})}, cwd=REPO)
        self.children.append(child)
        return child

    def serve(self, config: Path, service: str, *extra: str, env: dict[str, str] | None = None,
              name: str | None = None) -> Child:
        return self.spawn(name or service, [*CCR, "-c", str(config), "serve", service, *extra], env)

    def stop(self) -> None:
        """Envoy first (it holds streams to the services), then the decision services together: each may
        wait out its own bounded drain (for health checkers that never ask again), so one after another
        those waits added up. The rest (emulator, SPIRE) last, in reverse start order."""
        order = list(reversed(self.children))
        envoys = [c for c in order if c.name.split("-")[0] == "envoy"]
        services = [c for c in order if c.name.split("-")[0] in STANDALONE_PARTS]
        for c in envoys:
            c.stop(30)
        with ThreadPoolExecutor(max(1, len(services))) as pool:
            list(pool.map(lambda c: c.stop(30), services))
        for c in order:
            if not any(c is x for x in envoys + services):
                c.stop(30)


def _emulator(stack: Stack, tmp_path: Path) -> tuple[str, str]:
    """The provider's emulator, as one of the stack's children: (the upstream key it accepts, its address)."""
    key = "sk-ant-upstream-" + secrets.token_urlsafe(16)
    emu = stack.spawn("emulator", [sys.executable, "-m", "emulators.anthropic", "--port", "0", "--api-key", key,
                                   "--ready-file", str(tmp_path / "emulator.ready")])
    return key, str(wait_ready_file(emu, tmp_path / "emulator.ready")["address"])


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_replicas_survive_a_killed_and_a_drained_replica(stack: Stack, tmp_path: Path, postgres_server: dict,
                                                         redis_url: str) -> None:
    dsn = create_database(str(postgres_server["admin_dsn"]))
    key, emu_addr = _emulator(stack, tmp_path)

    r = subprocess.run([*CCR, "pki", "issue", str(tmp_path / "pki")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

    def addr() -> str:
        return f"127.0.0.1:{free_port()}"

    replicas = {n: [addr(), addr()] for n in ("extauth", "ratelimit", "accesslog")}
    single = {n: addr() for n in ("adapter", "router")}
    listen = free_port()
    cfg = {
        "gateway": {"listen": {"host": "127.0.0.1", "port": listen}, "admin": {"host": "127.0.0.1", "port": 0}},
        "services": {"drain_timeout_s": 20, "standalone": {
            **{n: {"listen": a[0], "endpoints": a} for n, a in replicas.items()},
            **{n: {"listen": a} for n, a in single.items()},
            "pki_dir": str(tmp_path / "pki"),
        }},
        "storage": {"postgres_dsn": dsn, "redis_url": redis_url, "data_dir": str(tmp_path / "data")},
        "providers": [{"name": "anthropic", "endpoint": f"http://{emu_addr}", "api_key_env": "UPSTREAM_KEY"}],
        "models": [{"match": "claude-*", "provider": "anthropic"}],
        "policy": {"dir": str(REPO / "policies")},
        # Envoy calls the ratelimit replicas at every request (as a mesh's Envoy does), so their loss and
        # stall below are on the request path (with the default, extauth decides the limits itself).
        "limits": {"admission": "ratelimit"},
    }
    router_metrics = addr()  # a fixed /metrics address, for the orchestrator's scraper
    cfg["services"]["standalone"]["router"]["metrics_listen"] = router_metrics
    config = tmp_path / "ccr.yaml"
    config.write_text(yaml.safe_dump(cfg))

    procs: dict[str, list[Child]] = {}
    for n, addrs in replicas.items():
        procs[n] = [stack.serve(config, n, name=n),
                    stack.serve(config, n, "--listen", addrs[1], "--instance", "2", name=f"{n}-2")]
    for n in single:
        procs[n] = [stack.serve(config, n)]
    # The adapter serves mutual TLS to Envoy's identity only: ask as Envoy.
    as_envoy = client_credentials(load_pki(tmp_path / "pki"), ID_ENVOY)
    for n, children in procs.items():
        addrs = replicas.get(n) or [single[n]]
        creds = as_envoy if n == "adapter" else None
        for child, a in zip(children, addrs, strict=True):
            wait_until(child, lambda a=a, c=creds: _serving(a, c), 90, f"{n} serving on {a}")

    with urllib.request.urlopen(f"http://{router_metrics}/metrics", timeout=5) as r:  # noqa: S310 - loopback
        assert 'ccr_xds_version_info{type="Listener"' in r.read().decode()

    # What a container health check runs: the adapter is asked over mTLS as Envoy.
    for n in ("adapter", "router", "extauth"):
        r = subprocess.run([*CCR, "-c", str(config), "probe", n], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "SERVING" in r.stdout, (n, r.stdout, r.stderr)

    envoys = [stack.serve(config, "envoy", env={"UPSTREAM_KEY": key}, name="envoy"),
              stack.serve(config, "envoy", "--instance", "2", env={"UPSTREAM_KEY": key}, name="envoy-2")]
    state = tmp_path / "data" / "standalone"
    admins: list[str] = []
    for e, d in zip(envoys, ("envoy", "envoy-2"), strict=True):
        admin_file = state / d / "envoy-admin-address"
        wait_until(e, lambda f=admin_file: f.exists() and f.read_text().strip() != "", 60, "admin up")
        admin = "http://" + admin_file.read_text().strip()
        wait_until(e, lambda u=admin: _http_ok(u + "/ready"), 60, "LIVE with config from the router")
        admins.append(admin)
    # The provider credential went to Envoy's state only; no service's environment has it.
    assert "UPSTREAM_KEY" not in Path(f"/proc/{procs['extauth'][0].pid}/environ").read_text()

    _, gw_key = create_key(dsn, "standalone-test", ["default"], actor="test")
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{listen}", api_key=gw_key, max_retries=0)
    tag = uuid.uuid4().hex[:8]
    total, kill_at = 160, 40
    done = threading.Semaphore(0)
    errors: list[str] = []
    request_ids: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            raw = client.messages.with_raw_response.create(
                model="claude-sonnet-4-5", max_tokens=16,
                messages=[{"role": "user", "content": f"{tag} request {i}"}])
            raw.parse()
            with lock:
                request_ids.append(raw.headers["x-request-id"])
        except Exception as e:  # noqa: BLE001 - every failure is the finding
            with lock:
                errors.append(f"request {i}: {e!r}")
        finally:
            done.release()

    with ThreadPoolExecutor(8) as pool:
        for i in range(total):
            pool.submit(one, i)
        for _ in range(kill_at):
            done.acquire()
        # Mid-run: one replica of each decision service dies hard, one accesslog replica drains.
        procs["extauth"][0].proc.send_signal(signal.SIGKILL)
        procs["ratelimit"][1].proc.send_signal(signal.SIGKILL)
        procs["accesslog"][0].proc.send_signal(signal.SIGTERM)
        for _ in range(total - kill_at):
            done.acquire()
    assert errors == [], f"{len(errors)} of {total} requests failed: {errors[:5]}" + _debug(admins)
    r = subprocess.run([*CCR, "-c", str(config), "probe", "extauth"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not serving" in r.stdout  # the killed replica held the configured address
    assert len(request_ids) == total
    # Every request has exactly one audit row (the drained receiver wrote what it had accepted).
    for rid in request_ids:
        assert len(log_rows(dsn, "request_id", rid, 1, timeout=60)) == 1
    with psycopg.connect(dsn) as conn:
        n = conn.execute("SELECT count(*) FROM request_log WHERE request_id = ANY(%s)", (request_ids,)).fetchone()
    assert n == (total,)
    # (The drained receiver's clean exit is checked at the end: its drain runs out while the next part does.)

    # The last ratelimit replica stalls (SIGSTOP) past its health check's timeout: Envoy marks it
    # unhealthy, and with the other replica dead no replica is healthy. Calls must still go to it
    # and succeed once it answers, not fail with "no healthy upstream" (what a loaded machine did
    # to the run above, once: 73 of the requests after the kill failed with the rate limit 503).
    last = procs["ratelimit"][0]
    last_addr = replicas["ratelimit"][0]
    last.proc.send_signal(signal.SIGSTOP)
    try:
        for e, admin in zip(envoys, admins, strict=True):
            wait_until(e, lambda u=admin: _health_flags(u, "ccr_ratelimit", last_addr) not in ("", "healthy"), 30,
                       "the stalled replica marked unhealthy")
        stalled = 8
        t0 = time.monotonic()
        with ThreadPoolExecutor(stalled) as pool:
            results = [pool.submit(one, total + i) for i in range(stalled)]
            # Every call is waiting on the stalled replica (not refused): then it wakes up.
            wait_until(last, lambda: sum(_active(u, "ccr_ratelimit", last_addr) for u in admins) >= stalled
                       or all(f.done() for f in results), 30, "calls waiting on the stalled replica")
            last.proc.send_signal(signal.SIGCONT)
            for f in results:
                f.result()
    finally:
        last.proc.send_signal(signal.SIGCONT)
    assert errors == [], f"{len(errors)} of {stalled} requests to a stalled last replica failed: {errors[:5]}" + \
        f"took {time.monotonic() - t0:.2f}s\n" + _debug(admins)
    assert len(request_ids) == total + stalled
    # The drained access-log receiver ends cleanly (once Envoy's stream to it ends or its drain time is up).
    assert procs["accesslog"][0].proc.wait(timeout=60) == 0, procs["accesslog"][0].log_tail()


def test_pki_issue_keeps_existing_identities_unless_forced(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert subprocess.run([*CCR, "pki", "issue", str(d)], capture_output=True, timeout=60).returncode == 0
    moved = tmp_path / "mounted-elsewhere"
    d.rename(moved)  # like a Kubernetes Secret mounted at another path: file names are relative
    assert Path(load_pki(moved).identities["envoy"].cert).is_file()
    moved.rename(d)
    pki = load_pki(d)
    assert set(pki.identities) == {"envoy", "adapter"} and Path(pki.ca).is_file()
    assert (Path(pki.identities["adapter"].key).stat().st_mode & 0o777) == 0o600
    first = Path(pki.ca).read_bytes()
    r = subprocess.run([*CCR, "pki", "issue", str(d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--force" in r.stderr
    assert Path(pki.ca).read_bytes() == first
    r = subprocess.run([*CCR, "pki", "issue", str(d), "--keep"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "kept" in r.stdout and Path(pki.ca).read_bytes() == first
    assert subprocess.run([*CCR, "pki", "issue", str(d), "--force"], capture_output=True, timeout=60).returncode == 0
    assert Path(load_pki(d).ca).read_bytes() != first


@pytest.mark.parametrize(("argument", "value", "why"), [
    ("instance", "../envoy", "--instance '../envoy': letters, digits, - and _ only"),
    ("instance", "a b", "--instance 'a b': letters, digits, - and _ only"),
    ("listen", "0.0.0.0", "--listen '0.0.0.0' is not host:port"),
    ("listen", "127.0.0.1:99999999", "is not host:port"),
    ("listen", "127.0.0.1:99999", "is not host:port"),
    ("listen", "127.0.0.1:90;rm", "is not host:port"),
])
def test_serve_refuses_a_bad_replica_argument(tmp_path: Path, argument: str, value: str, why: str) -> None:
    """An --instance names a directory and a --listen an address: anything else is refused before
    a migration runs or a process starts (the DSNs here lead nowhere)."""
    from ccr.pki import issue_run_pki, save_pki

    pki = tmp_path / "pki"
    save_pki(issue_run_pki(pki, ["envoy", "adapter"]), pki)
    a = "127.0.0.1:1"
    cfg = {"gateway": {"listen": {"port": 8080}},
           "services": {"standalone": {**{n: {"listen": a} for n in
                                          ("extauth", "ratelimit", "adapter", "accesslog", "router")},
                                       "pki_dir": str(pki)}},
           "storage": {"postgres_dsn": "postgresql://nobody@127.0.0.1:1/none", "redis_url": "redis://127.0.0.1:1/0",
                       "data_dir": str(tmp_path / "data")},
           "providers": [{"name": "anthropic", "api_key_env": "K"}],
           "models": [{"match": "claude-*", "provider": "anthropic"}]}
    path = tmp_path / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=re.escape(why)):
        serve("extauth", path, **{argument: value})
    assert not (tmp_path / "data" / "standalone" / "envoy").exists()


def test_standalone_addresses_need_a_real_port() -> None:
    from ccr.config import parse_config

    doc = {"providers": [{"name": "anthropic", "emulator": True}],
           "models": [{"match": "claude-*", "provider": "anthropic"}],
           "services": {"standalone": {n: {"listen": "127.0.0.1:9001"} for n in
                                       ("extauth", "ratelimit", "adapter", "accesslog", "router")}}}
    parse_config(doc)
    doc["services"]["standalone"]["extauth"] = {"listen": "0.0.0.0:9001", "endpoints": ["extauth:99999"]}
    with pytest.raises(ConfigError, match="the port must be 1 to 65535"):
        parse_config(doc)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_standalone_parts_take_their_svids_from_a_spire_agent(stack: Stack, tmp_path: Path, postgres_server: dict,
                                                              redis_url: str, transport: str) -> None:
    """services.spiffe.agent_socket: every `ccr serve` part takes its X.509-SVID from the deployment's
    SPIRE agent (no pki_dir), and every hop is SPIFFE mTLS, as under `ccr up`. The agent here is a
    real SPIRE server and agent with one entry per part: each part is started through an executable
    path of its own (a hard link of the interpreter; Envoy by its binary's path), as ccr up does."""
    from types import SimpleNamespace

    from ccr.spire import python_workload, start_spire
    from ccr.supervisor import envoy_binary
    from tests.test_spire import Svid, grpc_health_as

    dsn = create_database(str(postgres_server["admin_dsn"]))
    key, emu_addr = _emulator(stack, tmp_path)

    parts = ("extauth", "ratelimit", "adapter", "accesslog", "router")
    workloads = {p: python_workload(tmp_path / "workloads", p) for p in parts}
    workloads["envoy"] = Path(os.path.realpath(envoy_binary()))
    spire = start_spire(tmp_path / "spire-run", stack.logs, workloads)
    stack.children.extend(spire.children)

    addrs = {n: f"127.0.0.1:{free_port()}" for n in parts}
    listen = free_port()
    standalone: dict = {n: {"listen": a} for n, a in addrs.items()}
    front = f"127.0.0.1:{free_port()}"
    if transport == "http":  # extauth's HTTP front, mTLS with its SVID to Envoy's alone
        standalone["extauth"]["authz_http_listen"] = front
    cfg = {
        "gateway": {"listen": {"host": "127.0.0.1", "port": listen}, "admin": {"host": "127.0.0.1", "port": 0}},
        "services": {"drain_timeout_s": 5, "authz_transport": transport,
                     "spiffe": {"agent_socket": str(spire.agent_socket), "trust_domain": spire.trust_domain},
                     "standalone": standalone},
        "storage": {"postgres_dsn": dsn, "redis_url": redis_url, "data_dir": str(tmp_path / "data")},
        "providers": [{"name": "anthropic", "endpoint": f"http://{emu_addr}", "api_key_env": "UPSTREAM_KEY"}],
        "models": [{"match": "claude-*", "provider": "anthropic"}],
        "policy": {"dir": str(REPO / "policies")},
    }
    config = tmp_path / "ccr.yaml"
    config.write_text(yaml.safe_dump(cfg))

    procs = {n: stack.spawn(n, [str(workloads[n]), "-m", "ccr.cli", "-c", str(config), "serve", n]) for n in parts}
    # Each answers only Envoy's SPIFFE ID, over mTLS with the bundle of the agent's trust domain.
    as_envoy = Svid(tmp_path, "envoy", *spire.mint_x509("envoy"))
    gw = SimpleNamespace(spire=spire)
    for n, child in procs.items():
        wait_until(child, lambda a=addrs[n]: _health_as(gw, as_envoy, a) == 0, 90, f"{n} serving mTLS on {addrs[n]}")
    with grpc.insecure_channel(addrs["extauth"]) as ch, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # plaintext: no TLS handshake, no call
    # Another part's SVID (ratelimit's) may not call the adapter.
    as_ratelimit = Svid(tmp_path, "ratelimit", *spire.mint_x509("ratelimit"))
    assert grpc_health_as(gw, as_ratelimit, addrs["adapter"])[0] == grpc.StatusCode.PERMISSION_DENIED.value[0]

    envoy = stack.serve(config, "envoy", env={"UPSTREAM_KEY": key})
    admin_file = tmp_path / "data" / "standalone" / "envoy" / "envoy-admin-address"
    wait_until(envoy, lambda: admin_file.exists() and admin_file.read_text().strip() != "", 60, "admin up")
    admin = "http://" + admin_file.read_text().strip()
    wait_until(envoy, lambda: _http_ok(admin + "/ready"), 90, "LIVE with config from the router over mTLS")

    _, gw_key = create_key(dsn, "standalone-spiffe", ["default"], actor="test")
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{listen}", api_key=gw_key, max_retries=0)
    raw = client.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=16,
                                                   messages=[{"role": "user", "content": "hello"}])
    assert raw.parse().content
    client.messages.batches.list()  # through the adapter (ext_proc)
    assert len(log_rows(dsn, "request_id", raw.headers["x-request-id"], 1, timeout=60)) == 1
    with urllib.request.urlopen(admin + "/stats?format=json", timeout=5) as r:  # noqa: S310 - loopback admin
        stats = {s["name"]: s.get("value") for s in json.loads(r.read())["stats"] if "name" in s}
    extauth_cluster = "ccr_extauth_http" if transport == "http" else "ccr_extauth"
    for cluster in (extauth_cluster, "ccr_ratelimit", "ccr_adapter", "ccr_accesslog", "ccr_xds"):
        assert (stats.get(f"cluster.{cluster}.ssl.handshake") or 0) >= 1, cluster
    if transport == "http":  # the checks went to the front, over mTLS; none to the gRPC Check
        assert (stats.get("cluster.ccr_extauth_http.upstream_rq_200") or 0) >= 1
        assert (stats.get("cluster.ccr_extauth.upstream_rq_total") or 0) == 0
        # The front answers nobody without an SVID (plaintext: the TLS server gets no handshake).
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{front}/ccr-authz/health", timeout=5)  # noqa: S310
    # Envoy's own SVID (and no file identity) came from the agent over SDS.
    with urllib.request.urlopen(admin + "/certs", timeout=5) as r:  # noqa: S310 - loopback admin
        certs = json.loads(r.read())["certificates"]
    assert any(s.get("uri") == f"spiffe://{spire.trust_domain}/envoy" for entry in certs
               for c in entry.get("cert_chain", []) for s in c.get("subject_alt_names", []))


def _health_as(gw: object, svid: object, address: str) -> int:
    from tests.test_spire import grpc_health_as

    try:
        return grpc_health_as(gw, svid, address)[0]  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - not up yet (refused, handshake, early close): keep waiting
        return -1


def test_a_decision_call_attempt_is_never_cut_shorter_than_its_timeout() -> None:
    """Envoy makes a GrpcService retry policy's back-off max_interval the per-try timeout: each
    retried decision call (ext_authz, both rate limit filters) must keep its whole timeout per
    attempt, or a slow (loaded) replica is cut off and ejected (the 73 rate limit 503s)."""
    from ccr.config import load_config
    from router import resources

    config = load_config(REPO / "ccr.example.yaml")
    hcm = resources.listener(config, 8080, replicas=True)["filter_chains"][0]["filters"][0]["typed_config"]
    found = 0

    def walk(node: object) -> None:
        nonlocal found
        if isinstance(node, dict):
            if "retry_policy" in node and "timeout" in node:
                backoff = node["retry_policy"]["retry_back_off"]
                assert backoff["max_interval"] == node["timeout"], node
                found += 1
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(hcm)
    assert found >= 3  # identity-first ext_authz, ext_authz, the request limits (and spend, when on)


def _http_front_config(tmp_path: Path, extauth: dict, transport: str = "http", **others: dict) -> Path:
    from ccr.pki import issue_run_pki, save_pki

    pki = tmp_path / "pki"
    if not pki.exists():
        save_pki(issue_run_pki(pki, ["envoy", "adapter"]), pki)
    cfg = {"gateway": {"listen": {"port": 8080}},
           "services": {"authz_transport": transport, "standalone": {
               "extauth": extauth,
               **{n: others.get(n, {"listen": f"127.0.0.1:{9002 + i}"})
                  for i, n in enumerate(("ratelimit", "adapter", "accesslog", "router"))},
               "pki_dir": str(pki)}},
           "storage": {"postgres_dsn": "postgresql://nobody@127.0.0.1:1/none", "redis_url": "redis://127.0.0.1:1/0",
                       "data_dir": str(tmp_path / "data")},
           "providers": [{"name": "anthropic", "api_key_env": "K"}],
           "models": [{"match": "claude-*", "provider": "anthropic"}]}
    path = tmp_path / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_http_fronts_of_extauth_replicas_reach_the_runtime(tmp_path: Path) -> None:
    """authz_transport: http under `ccr serve`: where each extauth serves its HTTP front and where Envoy
    finds the replicas end up in every part's runtime (and in the static Envoy config)."""
    from ccr.runtime import EXTAUTH_HTTP
    from ccr.standalone import runtime_for, static_envoy_config
    from router import authz_http

    fronts = ["extauth-a.internal:9011", "extauth-b.internal:9011"]
    path = _http_front_config(tmp_path, {"listen": "0.0.0.0:9001", "endpoints": ["extauth.internal:9001"],
                                         "authz_http_listen": "0.0.0.0:9011", "authz_http_endpoints": fronts})
    _, rt = runtime_for(path, "envoy")
    assert rt.extauth_http == fronts[0] and rt.service_endpoints[EXTAUTH_HTTP] == fronts
    assert rt.service_endpoints["extauth"] == ["extauth.internal:9001"]
    doc = static_envoy_config(path)
    front = {c["name"]: c for c in doc["static_resources"]["clusters"]}[authz_http.CLUSTER]
    assert front["type"] == "STRICT_DNS" and "health_checks" in front
    assert [e["endpoint"]["address"]["socket_address"]["address"]
            for e in front["load_assignment"]["endpoints"][0]["lb_endpoints"]] == ["extauth-a.internal",
                                                                                    "extauth-b.internal"]
    # Without endpoints: the listen address, a wildcard as loopback (as for every part).
    path = _http_front_config(tmp_path, {"listen": "0.0.0.0:9001", "authz_http_listen": "0.0.0.0:9011"})
    _, rt = runtime_for(path, "envoy")
    assert rt.extauth_http == "127.0.0.1:9011" and rt.service_endpoints[EXTAUTH_HTTP] == ["127.0.0.1:9011"]
    # With gRPC there is no front, and no key for one.
    path = _http_front_config(tmp_path, {"listen": "0.0.0.0:9001"}, transport="grpc")
    _, rt = runtime_for(path, "envoy")
    assert rt.extauth_http is None and EXTAUTH_HTTP not in rt.service_endpoints


@pytest.mark.parametrize(("extauth", "transport", "others", "why"), [
    ({"listen": "0.0.0.0:9001"}, "http", {},
     "services.authz_transport is http but services.standalone.extauth.authz_http_listen is not set"),
    ({"listen": "0.0.0.0:9001", "authz_http_listen": "0.0.0.0:9011"}, "grpc", {},
     "extauth.authz_http_listen is set but services.authz_transport is grpc"),
    ({"listen": "0.0.0.0:9001", "authz_http_endpoints": ["extauth:9011"]}, "http", {},
     "authz_http_endpoints without authz_http_listen"),
    ({"listen": "0.0.0.0:9001", "authz_http_listen": "127.0.0.1:9011"}, "http", {},
     "must bind the host of listen ('0.0.0.0')"),
    ({"listen": "0.0.0.0:9001", "authz_http_listen": "0.0.0.0:9001"}, "http", {},
     "needs a port of its own"),
    ({"listen": "0.0.0.0:9001", "authz_http_listen": "0.0.0.0:99999"}, "http", {},
     "the port must be 1 to 65535"),
    ({"listen": "0.0.0.0:9001", "authz_http_listen": "0.0.0.0:9011", "authz_http_endpoints": ["x:0"]}, "http", {},
     "authz_http_endpoints"),
    ({"listen": "0.0.0.0:9001", "authz_http_listen": "0.0.0.0:9011"}, "http",
     {"ratelimit": {"listen": "0.0.0.0:9002", "authz_http_listen": "0.0.0.0:9012"}},
     "authz_http_listen/authz_http_endpoints are extauth's (its HTTP authorization front); ratelimit serve(s) none"),
])
def test_http_front_settings_are_refused_when_wrong(tmp_path: Path, extauth: dict, transport: str, others: dict,
                                                    why: str) -> None:
    """Each refusal names its field, before a migration runs or a process starts."""
    path = _http_front_config(tmp_path, extauth, transport, **others)
    with pytest.raises(ConfigError, match=re.escape(why)):
        serve("extauth", path)


@pytest.mark.parametrize(("kw", "why"), [
    ({"listen": "127.0.0.1:9101"}, "--listen for extauth needs --authz-http-listen too"),
    ({"listen": "127.0.0.1:9101", "authz_http_listen": "0.0.0.0:9111"},
     "--authz-http-listen host '0.0.0.0' is not the --listen host '127.0.0.1'"),
    ({"listen": "127.0.0.1:9101", "authz_http_listen": "127.0.0.1"},
     "--authz-http-listen '127.0.0.1' is not host:port"),
    ({"listen": "127.0.0.1:9101", "authz_http_listen": "127.0.0.1:9101"},
     "--authz-http-listen port 9101 is the gRPC port"),
])
def test_a_second_extauth_replica_needs_its_own_front(tmp_path: Path, kw: dict, why: str) -> None:
    """A second replica on one machine (--listen) must not try to bind the first one's front."""
    path = _http_front_config(tmp_path, {"listen": "127.0.0.1:9001", "authz_http_listen": "127.0.0.1:9011"})
    with pytest.raises(ConfigError, match=re.escape(why)):
        serve("extauth", path, **kw)


def test_authz_http_listen_is_extauths_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ccr.standalone

    def no_exec(*args: object) -> None:
        raise AssertionError(f"ccr serve went on to exec {args[1]}")

    monkeypatch.setattr(ccr.standalone.os, "execve", no_exec)
    path = _http_front_config(tmp_path, {"listen": "127.0.0.1:9001", "authz_http_listen": "127.0.0.1:9011"})
    with pytest.raises(ConfigError, match=re.escape("--authz-http-listen is for extauth")):
        serve("ratelimit", path, authz_http_listen="127.0.0.1:9111")


def _host_stat(admin: str, cluster: str, address: str, stat: str) -> int:
    prefix = f"{cluster}::{address}::{stat}::"
    return next((int(line.removeprefix(prefix)) for line in _cluster_hosts(admin) if line.startswith(prefix)), 0)


def test_http_front_replicas_survive_a_drained_replica(stack: Stack, tmp_path: Path, postgres_server: dict,
                                                       redis_url: str) -> None:
    """services.authz_transport: http under `ccr serve`: two extauth replicas, each serving its HTTP front at
    the configured address, behind one Envoy. One is stopped (SIGTERM) while requests keep flowing, from
    before the signal until after it has exited: no client sees an error (its front answers 503 to the
    health check, Envoy stops sending it checks, a check caught by its closing connection is retried on
    the other replica), and the replica exits cleanly."""
    from router import authz_http

    dsn = create_database(str(postgres_server["admin_dsn"]))
    key, emu_addr = _emulator(stack, tmp_path)
    r = subprocess.run([*CCR, "pki", "issue", str(tmp_path / "pki")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

    def addr() -> str:
        return f"127.0.0.1:{free_port()}"

    grpc_addrs, fronts = [addr(), addr()], [addr(), addr()]
    single = {n: addr() for n in ("ratelimit", "adapter", "accesslog", "router")}
    listen = free_port()
    cfg = {
        "gateway": {"listen": {"host": "127.0.0.1", "port": listen}, "admin": {"host": "127.0.0.1", "port": 0}},
        "services": {"drain_timeout_s": 10, "authz_transport": "http", "standalone": {
            "extauth": {"listen": grpc_addrs[0], "endpoints": grpc_addrs,
                        "authz_http_listen": fronts[0], "authz_http_endpoints": fronts},
            **{n: {"listen": a} for n, a in single.items()},
            "pki_dir": str(tmp_path / "pki"),
        }},
        "storage": {"postgres_dsn": dsn, "redis_url": redis_url, "data_dir": str(tmp_path / "data")},
        "providers": [{"name": "anthropic", "endpoint": f"http://{emu_addr}", "api_key_env": "UPSTREAM_KEY"}],
        "models": [{"match": "claude-*", "provider": "anthropic"}],
        "policy": {"dir": str(REPO / "policies")},
        # Requests flow for the whole drain (seconds): the default 600 a minute would refuse some.
        "limits": {"requests_per_minute": 1_000_000},
    }
    config = tmp_path / "ccr.yaml"
    config.write_text(yaml.safe_dump(cfg))

    extauth = [stack.serve(config, "extauth", name="extauth"),
               stack.serve(config, "extauth", "--listen", grpc_addrs[1], "--authz-http-listen", fronts[1],
                           "--instance", "2", name="extauth-2")]
    others = {n: stack.serve(config, n) for n in single}
    as_envoy = client_credentials(load_pki(tmp_path / "pki"), ID_ENVOY)
    # (extauth is not asked here: a drain waits until every recent health checker has heard it is
    # going, and the test's own probe would be one. Envoy's health checks below prove the fronts.)
    for n, child in others.items():
        wait_until(child, lambda a=single[n], c=(as_envoy if n == "adapter" else None): _serving(a, c), 90,
                   f"{n} serving")

    envoy = stack.serve(config, "envoy", env={"UPSTREAM_KEY": key}, name="envoy")
    admin_file = tmp_path / "data" / "standalone" / "envoy" / "envoy-admin-address"
    wait_until(envoy, lambda: admin_file.exists() and admin_file.read_text().strip() != "", 60, "admin up")
    admin = "http://" + admin_file.read_text().strip()
    wait_until(envoy, lambda: _http_ok(admin + "/ready"), 60, "LIVE with config from the router")
    for child, front in zip(extauth, fronts, strict=True):
        # Each replica serves its own front at its configured address: Envoy's HTTP health check passes.
        wait_until(child, lambda f=front: _health_flags(admin, authz_http.CLUSTER, f) == "healthy", 90,
                   f"{front} health-checked over HTTP")

    _, gw_key = create_key(dsn, "standalone-http", ["default"], actor="test")
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{listen}", api_key=gw_key, max_retries=0)

    def served(front: str) -> int:
        return _host_stat(admin, authz_http.CLUSTER, front, "rq_success")

    def hc_failures() -> int:
        with urllib.request.urlopen(admin + "/stats?filter=ccr_extauth_http.health_check.failure",  # noqa: S310
                                    timeout=5) as r:
            return sum(int(line.split(": ", 1)[1]) for line in r.read().decode().splitlines())

    def through(victim: Child, sig: signal.Signals, survivor: str) -> dict[str, int]:
        """Requests from 4 clients, flowing from before `sig` reaches `victim` until 16 after it exited;
        how many were sent before and after, and Envoy's failed health checks of the fronts at the exit."""
        errors: list[str] = []
        sent = {"before": 0, "after": 0}
        lock = threading.Lock()
        finished = threading.Event()

        def worker(w: int) -> None:
            i = 0
            while not finished.is_set():
                phase = "after" if victim.proc.poll() is not None else "before"
                try:
                    client.messages.create(model="claude-sonnet-4-5", max_tokens=16,
                                           messages=[{"role": "user", "content": f"{sig.name} {w} {i}"}])
                except Exception as e:  # noqa: BLE001 - every failure is the finding
                    with lock:
                        errors.append(f"worker {w} request {i} ({phase} the exit): {e!r}")
                with lock:
                    sent[phase] += 1
                    if sent["after"] >= 16:  # the survivor alone served a while
                        finished.set()
                i += 1

        start = {f: served(f) for f in fronts}
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(worker, w) for w in range(4)]
            try:
                # Both replicas answer checks over HTTP, then the signal.
                wait_until(envoy, lambda: all(served(f) > start[f] for f in fronts)
                           or any(f.done() for f in futures), 60, "checks on both fronts")
                victim.proc.send_signal(sig)
                assert victim.proc.wait(timeout=60) == (0 if sig == signal.SIGTERM else -sig), victim.log_tail()
                sent["hc_failures_at_exit"] = hc_failures()
                wait_until(envoy, lambda: finished.is_set() or any(f.done() for f in futures), 60,
                           "requests after the replica's exit")
            finally:
                finished.set()
                for f in futures:
                    f.result()
        assert errors == [], f"{len(errors)} of {sent} requests failed ({sig.name}): {errors[:5]}"
        # Every check after the exit went to the survivor (and the ones before it too, once Envoy stopped
        # choosing the victim).
        assert served(survivor) - start[survivor] >= sent["after"], (sent, start, served(survivor))
        return sent

    # SIGTERM: the replica's front answers 503 to health checks, Envoy stops choosing it, then it drains.
    failed_before = hc_failures()  # (Envoy may have asked a front before it was bound)
    sent = through(extauth[0], signal.SIGTERM, fronts[1])
    # Envoy's HTTP health check failed on the draining replica while it was still up (its 503 answer:
    # the front waits, up to 5 s, until each recent checker has heard it before it stops taking checks).
    assert sent["hc_failures_at_exit"] > failed_before, sent
    assert "out of rotation" in extauth[0].log_path.read_text()

    # SIGKILL of the other one, once the first is back: the checks in flight to it and those sent before
    # a health check notices are reset or refused, and retried on the live replica (without the
    # http_service retry policy, clients saw the 503 of an unreachable authorization service).
    extauth[0] = stack.serve(config, "extauth", name="extauth-again")
    wait_until(extauth[0], lambda: _health_flags(admin, authz_http.CLUSTER, fronts[0]) == "healthy", 90,
               "the first replica back in rotation")
    through(extauth[1], signal.SIGKILL, fronts[0])
    with urllib.request.urlopen(admin + "/stats?filter=ccr_extauth_http.upstream_rq_retry", timeout=5) as r:  # noqa: S310
        retries = dict(line.split(": ", 1) for line in r.read().decode().splitlines())
    # Checks were retried (each attempt reset or refused by the killed replica), and every retry succeeded.
    n = int(retries["cluster.ccr_extauth_http.upstream_rq_retry"])
    assert n >= 1 and retries["cluster.ccr_extauth_http.upstream_rq_retry_success"] == str(n), retries


def test_probe_of_extauth_asks_its_http_front_too(stack: Stack, tmp_path: Path, postgres_server: dict,
                                                  redis_url: str) -> None:
    """`ccr probe extauth` under services.authz_transport: http: the gRPC health service answering SERVING
    is not enough, the HTTP front (where Envoy's checks go) must answer 200 on its health path. One real
    extauth (`ccr serve extauth`); the same config with the front's address pointing at nothing, then at a
    server answering 503, must fail the probe and say why."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ccr.contract import AUTHZ_HTTP_HEALTH_PATH

    dsn = create_database(str(postgres_server["admin_dsn"]))
    r = subprocess.run([*CCR, "pki", "issue", str(tmp_path / "pki")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

    def addr() -> str:
        return f"127.0.0.1:{free_port()}"

    grpc_addr, front = addr(), addr()
    cfg = {
        "gateway": {"listen": {"host": "127.0.0.1", "port": free_port()}},
        "services": {"drain_timeout_s": 2, "authz_transport": "http", "standalone": {
            "extauth": {"listen": grpc_addr, "authz_http_listen": front},
            **{n: {"listen": addr()} for n in ("ratelimit", "adapter", "accesslog", "router")},
            "pki_dir": str(tmp_path / "pki"),
        }},
        "storage": {"postgres_dsn": dsn, "redis_url": redis_url, "data_dir": str(tmp_path / "data")},
        "providers": [{"name": "anthropic", "endpoint": "http://127.0.0.1:9", "api_key_env": "UPSTREAM_KEY"}],
        "models": [{"match": "claude-*", "provider": "anthropic"}],
        "policy": {"dir": str(REPO / "policies")},
    }

    def config_with_front(address: str, name: str) -> Path:
        cfg["services"]["standalone"]["extauth"]["authz_http_listen"] = address
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return path

    def probe(config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CCR, "-c", str(config), "probe", "extauth"], capture_output=True, text=True,
                              timeout=60)

    config = config_with_front(front, "ccr.yaml")
    extauth = stack.serve(config, "extauth")
    wait_until(extauth, lambda: _serving(grpc_addr) and _http_ok(f"http://{front}{AUTHZ_HTTP_HEALTH_PATH}"), 90,
               "extauth serving gRPC and its HTTP front")
    r = probe(config)
    assert r.returncode == 0 and "extauth: SERVING" in r.stdout, (r.stdout, r.stderr)

    # Nothing at the front's address (the gRPC port still SERVING): refused, naming the front.
    nowhere = addr()
    r = probe(config_with_front(nowhere, "no-front.yaml"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "not serving" in r.stdout and f"HTTP authorization front at {nowhere}" in r.stdout, r.stdout
    assert "did not answer" in r.stdout

    # Something answers there, but not 200.
    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(503)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    serving = threading.Thread(target=other.serve_forever, daemon=True)
    serving.start()
    try:
        where = f"127.0.0.1:{other.server_address[1]}"
        r = probe(config_with_front(where, "503-front.yaml"))
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert f"HTTP authorization front at {where}{AUTHZ_HTTP_HEALTH_PATH} answered 503" in r.stdout, r.stdout
    finally:
        other.shutdown()
        other.server_close()
        serving.join()


@pytest.mark.parametrize("reply", [b"SSH-2.0-not-http\r\n", b"", None], ids=["garbage", "closes", "silent"])
def test_the_fronts_probe_fails_on_anything_but_an_http_200(reply: bytes | None) -> None:
    """Whatever holds the front's port and lies (not HTTP, hangs up, never answers): the probe says so."""
    import socket

    from ccr.standalone import _front_health

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            if reply is None:
                conn.recv(4096)  # until the probe gives up and closes
                return
            conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        why = _front_health("127.0.0.1", port, timeout_s=0.3)
        assert why is not None and "did not answer" in why and f"127.0.0.1:{port}" in why
    finally:
        t.join(timeout=5)
        srv.close()
