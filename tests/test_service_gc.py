"""The services (ratelimit, and the grpc.aio ones such as extauth) freeze their start-up heap: a full GC
then walks only what calls made since, instead of stalling every call in flight for tens of ms over
~90k start-up objects."""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

from ccr.procs import Child, wait_until
from ccr.service import freeze_startup_heap
from tests.harness import running_service

REPO = Path(__file__).resolve().parent.parent
CONFIG = "version: 1\nproviders: [{name: anthropic}]\nmodels: [{match: '*', provider: anthropic}]\n"


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic GC frees it


def test_freeze_collects_start_up_garbage_first_and_freezes_what_lives() -> None:
    garbage = _Node()
    dead = weakref.ref(garbage)
    del garbage  # unreachable, but held by its own cycle
    kept = _Node()
    assert dead() is not None
    try:
        frozen = freeze_startup_heap()
        assert dead() is None, "start-up garbage was frozen instead of collected"
        # (not == get_freeze_count(): another thread of this test process may free a frozen object meanwhile)
        assert frozen > 0 and gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects()), "a live start-up object is still walked by the GC"
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())


def frozen_at_start(child: Child) -> int:
    """How many start-up objects the service said it froze, from its serving line (waited for)."""
    pattern = re.compile(r"serving on \S+ \((?:\d+ threads; )?(\d+) start-up objects frozen")
    found: list[int] = []

    def logged() -> bool:
        m = pattern.search(child.log_path.read_text(errors="replace"))
        if m:
            found.append(int(m.group(1)))
        return bool(m)

    wait_until(child, logged, 10, "its serving line")
    return found[0]


def test_ratelimit_freezes_its_start_up_heap(tmp_path: Path, redis_url: str) -> None:
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=redis_url) as child:
        assert frozen_at_start(child) > 10_000  # grpcio, protobuf, the config: the bulk of the process's objects


def test_extauth_freezes_its_start_up_heap(tmp_path: Path, postgres_dsn: str, redis_url: str) -> None:
    """extauth (grpc.aio) decides the request-time limits in its Check too: the same stalls, the same freeze."""
    from extauth.bundle import build_bundle

    bundle = build_bundle(REPO / "policies", tmp_path / "policy.tar.gz", "ccr/authz/decision")
    with running_service("extauth", tmp_path, CONFIG, postgres_dsn=postgres_dsn, redis_url=redis_url,
                         policy_bundle=str(bundle)) as child:
        assert frozen_at_start(child) > 10_000
