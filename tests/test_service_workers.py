"""Several worker processes per hot-path service on one port (services.workers, SO_REUSEPORT).

Real processes, real Redis and PostgreSQL. Which worker serves a connection is the kernel's
choice (a hash of the connection's addresses); a test finds out by looking at which worker holds
the accepted socket, so it can talk to each worker on purpose.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.rpc import code_pb2

from ccr.config import ConfigError, default_workers, parse_config
from ccr.procs import Child
from ccr.runtime import Runtime
from ccr.service import GRPC_OPTIONS
from ccr.supervisor import start_service
from extauth.bundle import build_bundle
from extauth.keys import create_key, revoke_key
from tests.harness import running_gateway
from tests.test_extauth import denied_error, http_check, msg_body

REPO = Path(__file__).resolve().parent.parent
CONFIG = "version: 1\nproviders: [{name: anthropic}]\nmodels: [{match: 'claude-*', provider: anthropic}]\n"
BASE = {"providers": [{"name": "anthropic"}], "models": [{"match": "claude-*", "provider": "anthropic"}]}


def _runtime(run: Path, **fields: object) -> Path:
    (run / "gateway.yaml").write_text(CONFIG)
    rt = Runtime(config_path=str(run / "gateway.yaml"), run_dir=str(run),
                 **{"postgres_dsn": "postgresql://unused@127.0.0.1:1/unused", "redis_url": "redis://127.0.0.1:1/0",
                    **fields})
    rt.save(run / "runtime.json")
    return run / "runtime.json"


def _peers_of(pid: int, port: int) -> set[str]:
    """The remote ends of the accepted TCP connections on `port` whose socket `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                peers.add(f[2])
    return peers


@contextmanager
def _channels_per_worker(address: str, workers: list[Child], call) -> Iterator[list[grpc.Channel]]:
    """One channel (its own TCP connection) served by each worker, after `call` answered on it.

    Opens connections until every worker holds one: each new connection lands on a worker by
    the kernel's hash, so 40 of them miss a given worker of two with probability 2**-40.
    """
    port = int(address.rpartition(":")[2])
    found: dict[int, grpc.Channel] = {}
    opened: list[grpc.Channel] = []
    try:
        for i in range(40):
            before = {w.pid: _peers_of(w.pid, port) for w in workers}
            # A channel of its own (not the process-wide subchannel pool): one new connection.
            ch = grpc.insecure_channel(address, options=[*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1),
                                                         ("ccr.test.channel", i)])
            opened.append(ch)
            call(ch)  # answered: some worker accepted the connection
            new = {pid: _peers_of(pid, port) - seen for pid, seen in before.items()}
            gained = [pid for pid, peers in new.items() if peers]
            if len(gained) == 1 and len(new[gained[0]]) == 1:  # else not attributable: try another
                found.setdefault(gained[0], ch)
            if len(found) == len(workers):
                break
        assert len(found) == len(workers), f"40 connections all went to {list(found)}"
        yield [found[w.pid] for w in workers]
    finally:
        for ch in opened:
            ch.close()


def _rl_refused(ch: grpc.Channel) -> None:
    """A call the service answers itself, without counting anything: no descriptors."""
    with pytest.raises(grpc.RpcError) as e:
        rls_pb2_grpc.RateLimitServiceStub(ch).ShouldRateLimit(rls_pb2.RateLimitRequest(domain="ccr"), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _authz_no_key(ch: grpc.Channel) -> None:
    resp = authz_grpc.AuthorizationStub(ch).Check(http_check({}, body=msg_body()), timeout=5)
    assert denied_error(resp)[0] == 401


def _rl_request(principal: str) -> rls_pb2.RateLimitRequest:
    d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "principal", "value": principal}])
    d.limit.requests_per_unit = 3
    d.limit.unit = rls_pb2.RateLimitResponse.RateLimit.HOUR
    return rls_pb2.RateLimitRequest(domain="ccr", descriptors=[d])


def test_two_ratelimit_workers_share_the_port_count_together_and_stop(tmp_path: Path, redis_url: str) -> None:
    runtime = _runtime(tmp_path, redis_url=redis_url)
    workers = start_service("ratelimit", "ratelimit", 2, runtime, tmp_path, tmp_path / "logs")
    try:
        assert len({w.pid for w in workers}) == 2 and all(w.alive() for w in workers)
        address = str(workers[0].info["address"])
        assert [w.info["address"] for w in workers] == [address, address]
        assert [w.info["pid"] for w in workers] == [w.pid for w in workers]

        req = _rl_request(f"workers_{time.time_ns()}")
        codes = []
        with _channels_per_worker(address, workers, _rl_refused) as channels:
            for ch in channels:
                stub = rls_pb2_grpc.RateLimitServiceStub(ch)
                codes += [stub.ShouldRateLimit(req, timeout=5).overall_code for _ in range(2)]
        # One counter in Redis for both workers: the fourth call, whichever worker answers it, is over 3.
        assert codes == [rls_pb2.RateLimitResponse.OK] * 3 + [rls_pb2.RateLimitResponse.OVER_LIMIT]
    finally:
        codes_at_exit = [w.stop() for w in workers]
    assert codes_at_exit == [0, 0], "\n".join(w.log_tail() for w in workers)
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", int(address.rpartition(":")[2])))


def test_a_worker_that_cannot_share_the_port_fails_the_start_and_nothing_is_left(tmp_path: Path) -> None:
    # Someone else holds the port without SO_REUSEPORT: worker 1 cannot bind, the start fails,
    # and worker 0 is stopped too.
    from ccr.procs import StartError
    from ccr.supervisor import spawn_worker, wait_worker

    runtime = _runtime(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        child = spawn_worker("ratelimit", "ratelimit", 1, runtime, tmp_path, tmp_path / "logs", port=port,
                             reuse_port=True)
        try:
            with pytest.raises(StartError, match="exited"):
                wait_worker(child, tmp_path, "ratelimit", 1, f"127.0.0.1:{port}")
        finally:
            child.stop()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(REPO / "policies", tmp_path_factory.mktemp("bundle") / "policy.tar.gz", "ccr/authz/decision")


def test_a_revoked_key_is_refused_by_every_extauth_worker(tmp_path: Path, postgres_dsn: str, redis_url: str,
                                                          bundle: Path) -> None:
    # Each worker caches keys in its own memory; each LISTENs for key changes on its own
    # connection, and PostgreSQL delivers a NOTIFY to every listener. (Redis: each worker also
    # decides the request's rate limits in its Check, limits.admission: extauth.)
    rec, key = create_key(postgres_dsn, "two-workers")
    req = http_check({"x-api-key": key}, body=msg_body())
    runtime = _runtime(tmp_path, postgres_dsn=postgres_dsn, redis_url=redis_url, policy_bundle=str(bundle))
    workers = start_service("extauth", "extauth", 2, runtime, tmp_path, tmp_path / "logs")
    try:
        address = str(workers[0].info["address"])
        with _channels_per_worker(address, workers, _authz_no_key) as channels:
            stubs = [authz_grpc.AuthorizationStub(ch) for ch in channels]
            for stub in stubs:
                assert stub.Check(req, timeout=5).status.code == code_pb2.OK  # cached in this worker now
            assert revoke_key(postgres_dsn, rec.id)
            for stub in stubs:
                deadline = time.monotonic() + 2.0
                while (resp := stub.Check(req, timeout=5)).status.code == code_pb2.OK:
                    assert time.monotonic() < deadline, "a worker still accepts the revoked key after 2 s"
                status, err = denied_error(resp)
                assert status == 401 and err["type"] == "authentication_error"
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0]


def test_envoy_concurrency_config() -> None:
    assert [parse_config(BASE).envoy_concurrency(cpus=n) for n in (1, 2, 3, 4, 16)] == [1, 2, 3, 4, 4]
    assert parse_config({**BASE, "gateway": {"concurrency": 6}}).envoy_concurrency(cpus=2) == 6
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="gateway.concurrency"):
            parse_config({**BASE, "gateway": {"concurrency": bad}})


def test_workers_config() -> None:
    assert parse_config({**BASE, "services": {"workers": 3}}).service_workers() == 3
    for bad in (0, -1, 65, "many"):
        with pytest.raises(ConfigError, match="services.workers"):
            parse_config({**BASE, "services": {"workers": bad}})
    # Unset: by cores, one per four, 1..4, and never more than Envoy's connections (its concurrency).
    assert [default_workers(n) for n in (1, 2, 4, 7, 8, 16, 64)] == [1, 1, 1, 1, 2, 4, 4]
    assert parse_config(BASE).service_workers(cpus=16) == 4  # Envoy: 4 threads on 16 cores
    assert parse_config(BASE).service_workers(cpus=2) == 1
    assert parse_config({**BASE, "gateway": {"concurrency": 1}}).service_workers(cpus=16) == 1
    assert parse_config({**BASE, "gateway": {"concurrency": 2}}).service_workers(cpus=16) == 2
    assert parse_config({**BASE, "gateway": {"concurrency": 8}}).service_workers(cpus=16) == 4
    assert parse_config({**BASE, "gateway": {"concurrency": 8}}).service_workers(cpus=2) == 1


def test_gateway_starts_and_stops_every_worker(tmp_path: Path) -> None:
    def two_workers(cfg: dict) -> None:
        cfg.setdefault("services", {})["workers"] = 2
        cfg["gateway"]["concurrency"] = 2

    with running_gateway(tmp_path, two_workers) as gw:
        assert gw.runtime is not None
        by_name = {c.name: c for c in gw.children}
        for name in ("extauth", "ratelimit", "accesslog"):
            pair = [by_name[name], by_name[f"{name}.1"]]
            assert all(c.alive() for c in pair) and pair[0].pid != pair[1].pid
            # Both ready (waited for) and on the one address Envoy is given.
            assert [c.info["address"] for c in pair] == [getattr(gw.runtime, name)] * 2
        assert not any(n.endswith(".2") for n in by_name)
        assert "adapter.1" not in by_name  # only the hot-path services have several workers
        r = httpx.post(f"{gw.url}/v1/messages", headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01"},
                       json={"model": "claude-sonnet-4-6", "max_tokens": 8, "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
        assert r.status_code == 200, r.text
        workers = [c for c in gw.children if c.name.split(".")[0] in ("extauth", "ratelimit", "accesslog")]
    assert len(workers) == 6 and not any(c.alive() for c in workers)  # stopped, and reaped
