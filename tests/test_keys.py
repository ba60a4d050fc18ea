"""Keys for machines against a real PostgreSQL: expiry, rotation with a grace period,
batched last use, revocation heard by every replica, and the admin log written in
the same transaction as each change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import psycopg
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.protobuf import json_format
from google.rpc import code_pb2

from ccr import db
from ccr.config import parse_config
from ccr.service import GRPC_OPTIONS
from extauth.bundle import build_bundle
from extauth.identity import Identity
from extauth.keys import (
    KeyChangeError,
    KeyStore,
    create_key,
    parse_duration,
    revoke_key,
    rotate_key,
    utcnow,
)
from extauth.policy import PolicyEngine
from extauth.principal import PrincipalKind
from extauth.server import Authorizer
from tests.harness import create_database, running_service
from tests.test_extauth import GATEWAY_YAML, REPO, http_check, msg_body


class Clock:
    """An injected wall clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def with_store(dsn: str, scenario: Callable[[KeyStore], Awaitable[None]], **kw) -> None:
    async def run() -> None:
        store = KeyStore(dsn, **kw)
        await store.start()
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(run())


def test_parse_duration() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("2w") == timedelta(days=14)
    for bad in ("", "10", "h", "1x", "-1h", "1.5h", "1h 30m"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)


def test_principal_carries_owner_and_tenant(postgres_dsn: str) -> None:
    rec, key = create_key(postgres_dsn, "etl", ["default"], owner="data-team", tenant="acme")

    async def scenario(store: KeyStore) -> None:
        p = await Identity(store).authenticate({"x-api-key": key})
        assert (p.kind, p.id, p.key_id, p.owner, p.tenant) == (PrincipalKind.KEY, rec.id, rec.id, "data-team", "acme")
        assert p.policy_input()["owner"] == "data-team" and p.policy_input()["tenant"] == "acme"

    with_store(postgres_dsn, scenario)


def test_expired_key_is_refused_even_from_the_cache(postgres_dsn: str) -> None:
    rec, key = create_key(postgres_dsn, "short", expires_in=timedelta(hours=1))
    assert rec.expires_at is not None and rec.expires_at - rec.created_at == timedelta(hours=1)
    clock = Clock()

    async def scenario(store: KeyStore) -> None:
        assert (await store.lookup(key)) == rec
        clock.now = rec.expires_at - timedelta(seconds=1)
        assert (await store.lookup(key)) == rec  # cached and still valid
        clock.now = rec.expires_at
        assert (await store.lookup(key)) is None

    with_store(postgres_dsn, scenario, clock=clock)


def test_key_past_its_expiry_in_the_database_is_not_loaded(postgres_dsn: str) -> None:
    rec, key = create_key(postgres_dsn, "lapsed", expires_at=utcnow() + timedelta(days=1))
    with psycopg.connect(postgres_dsn) as conn:  # as if a day had passed
        conn.execute("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = %s", (rec.id,))

    async def scenario(store: KeyStore) -> None:
        assert (await store.lookup(key)) is None

    with_store(postgres_dsn, scenario)


def test_rotation_grace_period(postgres_dsn: str) -> None:
    old, old_key = create_key(postgres_dsn, "rotating", ["haiku-only"], rpm=7, owner="ops", tenant="acme")
    clock = Clock()

    async def scenario(store: KeyStore) -> None:
        assert (await store.lookup(old_key)) == old
        gen = store.generation
        before = utcnow()
        old_after, new, new_key = rotate_key(postgres_dsn, old.id, timedelta(hours=1), actor="ops-admin")
        await asyncio.wait_for(store.wait_changed(gen), 1.0)
        assert new_key != old_key and new.id != old.id
        assert (new.name, new.groups, new.rpm, new.owner, new.tenant) == ("rotating", ("haiku-only",), 7, "ops", "acme")
        assert old_after.replaced_by == new.id and old_after.expires_at is not None
        assert before + timedelta(hours=1) - timedelta(seconds=5) < old_after.expires_at
        # Both work during the grace period ...
        assert (await store.lookup(old_key)) == old_after
        assert (await store.lookup(new_key)) == new
        # ... and only the new one once it has ended.
        clock.now = old_after.expires_at
        assert (await store.lookup(old_key)) is None
        assert (await store.lookup(new_key)) == new
        with pytest.raises(KeyChangeError, match="already rotated"):
            rotate_key(postgres_dsn, old.id)

    with_store(postgres_dsn, scenario, clock=clock)


def test_rotation_without_grace_refuses_the_old_key_at_once(postgres_dsn: str) -> None:
    old, old_key = create_key(postgres_dsn, "rotate-now")

    async def scenario(store: KeyStore) -> None:
        assert (await store.lookup(old_key)) == old
        gen = store.generation
        _, new, new_key = rotate_key(postgres_dsn, old.id)
        await asyncio.wait_for(store.wait_changed(gen), 1.0)
        assert (await store.lookup(old_key)) is None
        assert (await store.lookup(new_key)) == new

    with_store(postgres_dsn, scenario)


def test_revoked_or_expired_keys_cannot_be_rotated(postgres_dsn: str) -> None:
    rec, _ = create_key(postgres_dsn, "gone")
    assert revoke_key(postgres_dsn, rec.id)
    with pytest.raises(KeyChangeError, match="revoked or expired"):
        rotate_key(postgres_dsn, rec.id)
    with pytest.raises(KeyChangeError, match="no key with id"):
        rotate_key(postgres_dsn, "key_nonexistent0")
    with pytest.raises(ValueError, match="negative"):
        rotate_key(postgres_dsn, rec.id, timedelta(seconds=-1))


def last_used(dsn: str, key_id: str) -> datetime | None:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT last_used_at FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]


def test_last_use_is_batched_and_throttled_per_key(postgres_dsn: str) -> None:
    a, key_a = create_key(postgres_dsn, "used-a")
    b, key_b = create_key(postgres_dsn, "used-b")
    clock = Clock()

    async def scenario(store: KeyStore) -> None:
        t0 = clock.now
        for _ in range(5):
            assert (await store.lookup(key_a)) is not None
        assert (await store.lookup(key_b)) is not None
        # Nothing was written on the request path.
        assert last_used(postgres_dsn, a.id) is None and last_used(postgres_dsn, b.id) is None
        assert (await store.flush_last_used()) == 2  # one statement for both keys
        assert last_used(postgres_dsn, a.id) == t0 and last_used(postgres_dsn, b.id) == t0

        clock.advance(seconds=29)  # within the 30 s window: not noted again
        await store.lookup(key_a)
        assert (await store.flush_last_used()) == 0
        clock.advance(seconds=1)
        await store.lookup(key_a)
        assert (await store.flush_last_used()) == 1
        assert last_used(postgres_dsn, a.id) == t0 + timedelta(seconds=30)
        assert last_used(postgres_dsn, b.id) == t0

    # A flush period far beyond the test: only the explicit flushes write.
    with_store(postgres_dsn, scenario, clock=clock, last_used_every_s=30, flush_every_s=3600)


def test_last_use_is_written_by_the_background_task_and_on_close(postgres_dsn: str) -> None:
    rec, key = create_key(postgres_dsn, "used-bg")

    async def scenario(store: KeyStore) -> None:
        await store.lookup(key)

    with_store(postgres_dsn, scenario, flush_every_s=3600)
    assert last_used(postgres_dsn, rec.id) is not None  # close() flushed what was pending

    rec2, key2 = create_key(postgres_dsn, "used-bg-2")

    async def scenario2(store: KeyStore) -> None:
        await store.lookup(key2)
        while last_used(postgres_dsn, rec2.id) is None:  # written by the loop, not by close()
            await asyncio.sleep(0.01)

    with_store(postgres_dsn, scenario2, flush_every_s=0.01)


def test_revocation_reaches_every_replica_within_a_second(postgres_dsn: str) -> None:
    rec, key = create_key(postgres_dsn, "replicated")

    async def scenario() -> None:
        replicas = [KeyStore(postgres_dsn, ttl_s=3600), KeyStore(postgres_dsn, ttl_s=3600)]
        for r in replicas:
            await r.start()
        try:
            for r in replicas:  # cached for an hour in each
                assert (await r.lookup(key)) == rec
            gens = [r.generation for r in replicas]
            t0 = time.monotonic()
            assert revoke_key(postgres_dsn, rec.id, actor="sec-team")
            await asyncio.wait_for(asyncio.gather(*(r.wait_changed(g) for r, g in zip(replicas, gens, strict=True))),
                                   timeout=1.0)
            assert [await r.lookup(key) for r in replicas] == [None, None]
            assert time.monotonic() - t0 < 1.0
        finally:
            for r in replicas:
                await r.close()

    asyncio.run(scenario())


# -- the admin log and its change commit together -----------------------------------


@pytest.fixture()
def fresh_dsn(postgres_server: dict[str, object]) -> Iterator[str]:
    """A database of its own: these tests install failure triggers."""
    admin = str(postgres_server["admin_dsn"])
    dsn = create_database(admin)
    db.migrate(dsn)
    yield dsn
    name = dsn.rsplit("/", 1)[1]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _fail_when(dsn: str, table: str, when: str, event: str = "INSERT") -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(f"""
            CREATE FUNCTION fail_{table}() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'injected failure on {table}'; END $$;
            CREATE TRIGGER fail_{table} BEFORE {event} ON {table} FOR EACH ROW WHEN ({when})
            EXECUTE FUNCTION fail_{table}();
        """)


def _admin_rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT actor, action, target, before, after FROM admin_log ORDER BY id").fetchall()


def _key(dsn: str, key_id: str) -> tuple:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT revoked_at, expires_at, replaced_by FROM api_keys WHERE id = %s",
                            (key_id,)).fetchone()


def test_each_change_writes_one_admin_row(fresh_dsn: str) -> None:
    rec, key = create_key(fresh_dsn, "audited", ["g"], owner="o", tenant="t", actor="alice")
    _, new, new_key = rotate_key(fresh_dsn, rec.id, timedelta(minutes=5), actor="bob")
    assert revoke_key(fresh_dsn, new.id, actor="carol")
    assert not revoke_key(fresh_dsn, new.id, actor="carol")  # no change, no row
    rows = _admin_rows(fresh_dsn)
    assert [(a, act, t) for a, act, t, _, _ in rows] == [
        ("alice", "key.create", rec.id), ("bob", "key.rotate", rec.id), ("carol", "key.revoke", new.id)]
    (_, _, _, c_before, c_after), (_, _, _, r_before, r_after), (_, _, _, v_before, v_after) = rows
    assert c_before is None and c_after["owner"] == "o" and c_after["tenant"] == "t" and c_after["groups"] == ["g"]
    assert r_before["replaced_by"] is None and r_before["expires_at"] is None
    assert r_after["old"]["replaced_by"] == new.id and r_after["old"]["expires_at"] is not None
    assert r_after["new"]["id"] == new.id
    assert v_before["revoked_at"] is None and v_after["revoked_at"] is not None
    dump = repr(rows)  # never a key or its hash
    assert "key_hash" not in dump
    assert key[len(rec.key_prefix):] not in dump and new_key[len(new.key_prefix):] not in dump


def test_a_failed_change_leaves_no_admin_row(fresh_dsn: str) -> None:
    rec, _ = create_key(fresh_dsn, "unrevokable")
    baseline = _admin_rows(fresh_dsn)
    _fail_when(fresh_dsn, "api_keys", "NEW.name IN ('boom', 'unrevokable')", "INSERT OR UPDATE")
    with pytest.raises(psycopg.errors.RaiseException, match="injected failure"):
        create_key(fresh_dsn, "boom", actor="alice")
    with pytest.raises(psycopg.errors.RaiseException, match="injected failure"):
        revoke_key(fresh_dsn, rec.id, actor="alice")
    with pytest.raises(psycopg.errors.RaiseException, match="injected failure"):
        rotate_key(fresh_dsn, rec.id, actor="alice")
    assert _admin_rows(fresh_dsn) == baseline
    assert _key(fresh_dsn, rec.id) == (None, None, None)


def test_a_failed_admin_row_leaves_no_change(fresh_dsn: str) -> None:
    rec, _ = create_key(fresh_dsn, "guarded", actor="setup")
    _fail_when(fresh_dsn, "admin_log", "NEW.actor = 'audit-down'")
    with pytest.raises(psycopg.errors.RaiseException, match="injected failure"):
        create_key(fresh_dsn, "never", actor="audit-down")
    with pytest.raises(psycopg.errors.RaiseException, match="injected failure"):
        revoke_key(fresh_dsn, rec.id, actor="audit-down")
    with pytest.raises(psycopg.errors.RaiseException, match="injected failure"):
        rotate_key(fresh_dsn, rec.id, timedelta(hours=1), actor="audit-down")
    with psycopg.connect(fresh_dsn) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM api_keys ORDER BY created_at")]
    assert names == ["guarded"]  # neither the created key nor a rotation successor exists
    assert _key(fresh_dsn, rec.id) == (None, None, None)
    assert [r[1] for r in _admin_rows(fresh_dsn)] == ["key.create"]


def test_check_metadata_carries_owner_tenant_and_peer_spiffe_id(postgres_dsn: str, tmp_path: Path) -> None:
    config = parse_config({
        "providers": [{"name": "anthropic"}], "models": [{"match": "claude-*", "provider": "anthropic"}],
        "gateway": {"tls": {"cert_file": "c", "key_file": "k", "client_ca_file": "ca"}},
        "identity": {"spiffe": {"enabled": True, "trust_domains": ["example.org"]}},
    })
    policy = PolicyEngine.load(build_bundle(REPO / "policies", tmp_path / "b.tar.gz", "ccr/authz/decision"),
                               "ccr/authz/decision")
    rec, key = create_key(postgres_dsn, "meta", owner="data-team", tenant="acme")
    peer = "spiffe://example.org/ns/batch/sa/job"

    async def scenario(store: KeyStore) -> None:
        auth = Authorizer(config, Identity(store, spiffe=config.identity.spiffe), policy)
        req = http_check({"x-api-key": key}, body=msg_body("claude-sonnet-4-5"))
        req.attributes.source.principal = peer
        resp = await auth.check(req)
        meta = json_format.MessageToDict(resp.dynamic_metadata)
        assert meta["principal_kind"] == "key" and meta["key_id"] == rec.id
        assert (meta["owner"], meta["tenant"], meta["spiffe_id"]) == ("data-team", "acme", peer)

    try:
        with_store(postgres_dsn, scenario)
    finally:
        policy.close()


def test_revocation_reaches_two_extauth_processes_within_a_second(
    postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rec, key = create_key(postgres_dsn, "two-replicas")
    req = http_check({"x-api-key": key}, body=msg_body())
    bundle = build_bundle(REPO / "policies", tmp_path_factory.mktemp("b") / "policy.tar.gz", "ccr/authz/decision")
    runs = [tmp_path_factory.mktemp("extauth-a"), tmp_path_factory.mktemp("extauth-b")]
    with running_service("extauth", runs[0], GATEWAY_YAML, postgres_dsn=postgres_dsn, policy_bundle=str(bundle)) as a, \
            running_service("extauth", runs[1], GATEWAY_YAML, postgres_dsn=postgres_dsn,
                            policy_bundle=str(bundle)) as b:
        channels = [grpc.insecure_channel(str(c.info["address"]), options=GRPC_OPTIONS) for c in (a, b)]
        try:
            stubs = [pb_grpc.AuthorizationStub(ch) for ch in channels]
            assert [s.Check(req).status.code for s in stubs] == [code_pb2.OK, code_pb2.OK]  # cached in both
            t0 = time.monotonic()
            assert revoke_key(postgres_dsn, rec.id, actor="sec-team")
            pending = list(stubs)
            while pending:  # the condition itself: each replica refuses the key
                pending = [s for s in pending if s.Check(req).status.code == code_pb2.OK]
                assert time.monotonic() - t0 < 1.0, f"{len(pending)} replica(s) still accept a revoked key after 1 s"
            assert [s.Check(req).status.code for s in stubs] == [code_pb2.UNAUTHENTICATED] * 2
        finally:
            for ch in channels:
                ch.close()
