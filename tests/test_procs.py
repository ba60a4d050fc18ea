"""Child processes started from a process with live gRPC traffic start reliably.

gRPC registers pthread_atfork handlers; in a child forked (not vforked) from a process with
gRPC threads they restart a poller thread that races exec and can abort the child with
SIGABRT. `spawn` puts no Python code between fork and exec (setpriv does the parent-death
signal and the user switch), so CPython vforks and those handlers never run in the child.
Before that change this test lost about one child in six.

Also: the free ports servers are started on are chosen outside the kernel's ephemeral range.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from ccr import procs
from ccr.procs import launcher, spawn


class _Allow(pb_grpc.AuthorizationServicer):
    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:  # noqa: N802
        return pb.CheckResponse()


@pytest.fixture()
def grpc_traffic() -> Iterator[int]:
    """A gRPC server and a client calling it in a loop, in this (the parent) process."""
    started = threading.Event()
    box: dict[str, object] = {}

    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_AuthorizationServicer_to_server(_Allow(), server)
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box["stop"] = asyncio.Event()
        box["loop"] = asyncio.get_running_loop()
        started.set()
        await box["stop"].wait()  # type: ignore[attr-defined]
        await server.stop(0)

    t = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    t.start()
    assert started.wait(10)
    calls = 0
    done = threading.Event()

    def load() -> None:
        nonlocal calls
        with grpc.insecure_channel(f"127.0.0.1:{box['port']}") as ch:
            stub = pb_grpc.AuthorizationStub(ch)
            while not done.is_set():
                stub.Check(pb.CheckRequest())
                calls += 1

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    yield int(box["port"])  # type: ignore[call-overload]
    done.set()
    loader.join(10)
    box["loop"].call_soon_threadsafe(box["stop"].set)  # type: ignore[attr-defined]
    t.join(10)
    assert calls > 0, "the gRPC client made no call while children were started"


def test_children_survive_a_parent_with_grpc_threads(grpc_traffic: int, tmp_path: Path) -> None:
    assert launcher(), "setpriv (util-linux) is expected on this machine"
    codes = []
    for i in range(200):
        child = spawn(f"c{i}", ["/bin/true"], tmp_path)
        codes.append(child.proc.wait(10))
    assert codes == [0] * 200, f"{sum(c != 0 for c in codes)} of 200 children died: {sorted(set(codes))}"


def test_free_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    # Outgoing connections take their local ports from the ephemeral range: a port chosen there could be taken
    # between the choice and the server's bind.
    low = procs.ephemeral_low()
    for _ in range(50):
        port = procs.free_port()
        assert procs.PORT_FLOOR <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_never_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", procs.free_port()))
        taken, other = held.getsockname()[1], procs.free_port()
        picks = iter([taken, taken, other])
        monkeypatch.setattr(procs.random, "randrange", lambda a, b: next(picks))
        assert procs.free_port() == other != taken


def test_without_room_below_the_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    # An ephemeral range reaching down near PORT_FLOOR (or an unreadable one) leaves the choice to bind(0).
    monkeypatch.setattr(procs, "ephemeral_low", lambda: procs.PORT_FLOOR + 10)
    monkeypatch.setattr(procs.random, "randrange", lambda a, b: pytest.fail("picked below a range with no room"))
    port = procs.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    monkeypatch.undo()
    monkeypatch.setattr(procs, "_EPHEMERAL_RANGE", Path("/nonexistent/ip_local_port_range"))
    assert procs.ephemeral_low() == 32768  # unreadable: Linux's default low end
