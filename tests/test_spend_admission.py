"""Budget admission through the real rate limit service (gRPC, real Redis and PostgreSQL).

The concurrency proof: 200 requests at once, over two ratelimit processes sharing one Redis,
against a budget with room for exactly 10 worst cases: exactly 10 are admitted, and after
settlement the budget's spend is within its cap.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import psycopg
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from audit.ledger import Settlement, Settler
from ccr import db
from ccr.budgets import Budget, Facts, Period, SubjectKind, counter_key, set_budget, spend_facts_json, window
from ccr.contract import H_BUDGET, H_BUDGET_WARNING, SPEND_COUNTERS, SPEND_DOMAIN, SPEND_RESERVED
from ccr.localservers import start_redis
from ccr.procs import wait_until
from tests.harness import create_database, running_service

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
W = 1_000_000  # one worst case: $1

CONFIG = """
version: 1
providers: [{name: anthropic}]
models: [{match: "claude-*", provider: anthropic, price: {input: 3, output: 15}}]
spend: {refresh_s: 0.1}
"""


@pytest.fixture(scope="module")
def dsn(postgres_server: dict[str, object]) -> str:
    d = create_database(str(postgres_server["admin_dsn"]), "spend")
    db.migrate(d)
    return d


def _budget(dsn: str, b: Budget) -> None:
    with psycopg.connect(dsn) as conn:
        set_budget(conn, b, "test")


def _name() -> str:
    return f"b{uuid.uuid4().hex[:10]}"


def spend_req(reserve: int, *, principal: str, groups: tuple[str, ...] = (), tenant: str | None = None,
              rid: str | None = None, charge_only: bool = False) -> rls_pb2.RateLimitRequest:
    facts = spend_facts_json(reserve, Facts(principal, "key", principal, groups, tenant, None), "claude-x",
                             charge_only=charge_only)
    d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "spend", "value": facts},
                                                   {"key": "request_id", "value": rid or uuid.uuid4().hex}])
    return rls_pb2.RateLimitRequest(domain=SPEND_DOMAIN, descriptors=[d])


def _settle(redis_url: str, settlements: list[Settlement]) -> None:
    async def go() -> None:
        s = Settler(redis_url, [80, 90, 100], None)
        try:
            for x in settlements:
                await s._settle(x)  # raise on a Redis error: the test wants to see it
        finally:
            await s.stop()
    asyncio.run(go())


def _settlement(rid: str, resp: rls_pb2.RateLimitResponse, actual: int) -> Settlement:
    md = resp.dynamic_metadata.fields
    counters = [dict(v.struct_value) for v in md[SPEND_COUNTERS].list_value.values]
    return Settlement(rid, actual, int(md[SPEND_RESERVED].number_value), counters)


def test_200_concurrent_requests_over_two_replicas_spend_no_more_than_the_cap(
        tmp_path: Path, dsn: str, redis_url: str) -> None:
    group = _name()
    b = Budget(_name(), SubjectKind.GROUP, group, Period.DAY, 10 * W, scope="shared")
    _budget(dsn, b)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with running_service("ratelimit", tmp_path / "a", CONFIG, redis_url=redis_url, postgres_dsn=dsn) as a, \
            running_service("ratelimit", tmp_path / "b", CONFIG, redis_url=redis_url, postgres_dsn=dsn) as b2, \
            grpc.insecure_channel(str(a.info["address"])) as ca, grpc.insecure_channel(str(b2.info["address"])) as cb:
        stubs = [rls_pb2_grpc.RateLimitServiceStub(ca), rls_pb2_grpc.RateLimitServiceStub(cb)]
        reqs = [(uuid.uuid4().hex, i) for i in range(200)]
        futures = [(rid, stubs[i % 2].ShouldRateLimit.future(
            spend_req(W, principal=f"key_{i}", groups=(group,), rid=rid), timeout=30)) for rid, i in reqs]
        answers = [(rid, f.result()) for rid, f in futures]
        admitted = [(rid, r) for rid, r in answers if r.overall_code == OK]
        refused = [r for _, r in answers if r.overall_code == OVER]
        assert len(admitted) == 10 and len(refused) == 190
        body = refused[0].raw_body.decode()
        assert '"billing_error"' in body and b.name in body and "resets at" in body
        assert dict((h.key, h.value) for h in refused[0].response_headers_to_add)[H_BUDGET] == b.name

        r = redis.Redis.from_url(redis_url)
        key = counter_key(b, "", window(Period.DAY, "UTC", float(r.time()[0])))
        assert int(r.get(key)) == 10 * W  # type: ignore[arg-type]
        # Settle: each admitted request actually cost 40% of its worst case; a retried settlement
        # changes nothing (idempotent per request id).
        done = [_settlement(rid, resp, 4 * W // 10) for rid, resp in admitted]
        _settle(redis_url, done + done[:3])
        assert int(r.get(key)) == 4 * W  # type: ignore[arg-type]
        # The released room is usable again: 6 more worst cases fit, the 7th does not.
        more = [stubs[i % 2].ShouldRateLimit(spend_req(W, principal="key_x", groups=(group,)), timeout=10)
                for i in range(7)]
        assert [m.overall_code for m in more] == [OK] * 6 + [OVER]
        assert int(r.get(key)) == 10 * W  # type: ignore[arg-type]
        # Batch results (spent already) are charged to a full budget, never refused.
        rid = uuid.uuid4().hex
        charged = stubs[0].ShouldRateLimit(spend_req(0, principal="key_x", groups=(group,), rid=rid,
                                                     charge_only=True), timeout=10)
        assert charged.overall_code == OK
        _settle(redis_url, [_settlement(rid, charged, 3 * W)])
        assert int(r.get(key)) == 13 * W  # type: ignore[arg-type]


def test_tightest_budget_wins_and_per_seat_counts_each_member(tmp_path: Path, dsn: str, redis_url: str) -> None:
    group = _name()
    _budget(dsn, Budget(_name(), SubjectKind.GROUP, group, Period.DAY, 100 * W, scope="shared"))
    _budget(dsn, Budget(_name(), SubjectKind.GROUP, group, Period.MONTH, 2 * W, scope="per_seat"))
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=redis_url, postgres_dsn=dsn) as svc, \
            grpc.insecure_channel(str(svc.info["address"])) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        alice = [stub.ShouldRateLimit(spend_req(W, principal="alice", groups=(group,))).overall_code
                 for _ in range(3)]
        bob = [stub.ShouldRateLimit(spend_req(W, principal="bob", groups=(group,))).overall_code
               for _ in range(3)]
        assert alice == [OK, OK, OVER] and bob == [OK, OK, OVER]


def test_budget_changes_apply_without_a_restart_and_soft_budgets_warn(tmp_path: Path, dsn: str,
                                                                     redis_url: str) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=redis_url, postgres_dsn=dsn) as svc, \
            grpc.insecure_channel(str(svc.info["address"])) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        first = stub.ShouldRateLimit(spend_req(W, principal=key))
        assert first.overall_code == OK and SPEND_RESERVED not in first.dynamic_metadata.fields  # no budget
        name = _name()
        _budget(dsn, Budget(name, SubjectKind.KEY, key, Period.WEEK, W // 2))
        wait_until(svc, lambda: stub.ShouldRateLimit(spend_req(W, principal=key)).overall_code == OVER, 10,
                   "the new budget to apply")
        # Made soft: admitted past the cap, with a warning header naming the budget.
        _budget(dsn, Budget(name, SubjectKind.KEY, key, Period.WEEK, W // 2, mode="soft"))
        wait_until(svc, lambda: stub.ShouldRateLimit(spend_req(W, principal=key)).overall_code == OK, 10,
                   "the budget to become soft")
        soft = stub.ShouldRateLimit(spend_req(W, principal=key))
        warn = dict((h.key, h.value) for h in soft.response_headers_to_add)[H_BUDGET_WARNING]
        assert name in warn and "soft" in warn


def test_redis_down_fails_open_or_closed_per_budget(tmp_path: Path, dsn: str, own_redis: str) -> None:
    open_key, closed_key, free_key = (f"key_{uuid.uuid4().hex[:8]}" for _ in range(3))
    _budget(dsn, Budget(_name(), SubjectKind.KEY, open_key, Period.DAY, 5 * W, on_redis_down="open"))
    _budget(dsn, Budget(_name(), SubjectKind.KEY, closed_key, Period.DAY, 5 * W, on_redis_down="closed"))
    r = redis.Redis.from_url(own_redis)
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=own_redis, postgres_dsn=dsn) as svc, \
            grpc.insecure_channel(str(svc.info["address"])) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        assert stub.ShouldRateLimit(spend_req(W, principal=closed_key)).overall_code == OK
        r.shutdown(nosave=True)  # Redis goes away mid-run
        opened = stub.ShouldRateLimit(spend_req(W, principal=open_key))
        assert opened.overall_code == OK
        assert "store unavailable" in dict((h.key, h.value) for h in opened.response_headers_to_add)[H_BUDGET_WARNING]
        with pytest.raises(grpc.RpcError) as e:
            stub.ShouldRateLimit(spend_req(W, principal=closed_key))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # No budget applies: nothing to check, admitted.
        assert stub.ShouldRateLimit(spend_req(W, principal=free_key)).overall_code == OK


def test_counters_lost_in_redis_are_rebuilt_from_the_ledger(tmp_path: Path, dsn: str, own_redis: str) -> None:
    tenant = _name()
    b = Budget(_name(), SubjectKind.TENANT, tenant, Period.MONTH, 10 * W, scope="shared")
    _budget(dsn, b)
    r = redis.Redis.from_url(own_redis)
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=own_redis, postgres_dsn=dsn) as svc, \
            grpc.insecure_channel(str(svc.info["address"])) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        admitted = []
        for _ in range(9):
            rid = uuid.uuid4().hex
            resp = stub.ShouldRateLimit(spend_req(W, principal="k1", tenant=tenant, rid=rid))
            assert resp.overall_code == OK
            admitted.append((rid, resp))
        # The audit receiver settles them and writes the ledger (the truth), as it does for real traffic.
        _settle(own_redis, [_settlement(rid, resp, W) for rid, resp in admitted])
        with psycopg.connect(dsn) as conn:
            for rid, _ in admitted:
                conn.execute("INSERT INTO spend_ledger (request_id, ts, principal_id, tenant, status, "
                             "cost_micro_usd, reserved_micro_usd) VALUES (%s, now(), 'k1', %s, 200, %s, %s)",
                             (rid, tenant, W, W))
        r.flushall()  # Redis loses every counter
        # Rebuilt from the ledger: 9 of 10 spent, so one more fits and the next does not.
        assert stub.ShouldRateLimit(spend_req(W, principal="k2", tenant=tenant)).overall_code == OK
        assert stub.ShouldRateLimit(spend_req(W, principal="k3", tenant=tenant)).overall_code == OVER
        key = counter_key(b, "", window(Period.MONTH, "UTC", float(r.time()[0])))
        assert int(r.get(key)) == 10 * W  # type: ignore[arg-type]


def test_redis_killed_mid_run_loses_no_spend_and_caps_still_hold(tmp_path: Path, dsn: str) -> None:
    """Redis (no persistence) is killed with requests in flight and started again empty. The audit
    receiver writes their ledger rows, then settles; counters are rebuilt from the ledger."""
    from ccr.localservers import _redis_bin
    from ccr.procs import spawn
    from tests.test_spend_ledger import complete, entry, send

    redis_dir = tmp_path / "redis"
    first = start_redis(redis_dir, tmp_path / "logs")
    url = str(first.info["url"])
    tenant = _name()
    b = Budget(_name(), SubjectKind.TENANT, tenant, Period.MONTH, 10 * W, scope="shared")
    _budget(dsn, b)
    cost = complete(0, W // 15)  # output tokens at $15/MTok: just under W each
    each = W // 15 * 15
    second = None
    (tmp_path / "rl").mkdir()
    (tmp_path / "au").mkdir()
    try:
        with running_service("ratelimit", tmp_path / "rl", CONFIG, redis_url=url, postgres_dsn=dsn) as svc, \
                running_service("audit", tmp_path / "au", CONFIG, redis_url=url, postgres_dsn=dsn) as audit, \
                grpc.insecure_channel(str(svc.info["address"])) as ch:
            stub = rls_pb2_grpc.RateLimitServiceStub(ch)

            def admit(principal: str) -> tuple[str, rls_pb2.RateLimitResponse]:
                rid = uuid.uuid4().hex
                return rid, stub.ShouldRateLimit(spend_req(W, principal=principal, tenant=tenant, rid=rid))

            done = [admit(f"k{i}") for i in range(5)]
            assert all(r.overall_code == OK for _, r in done)
            send(audit, [entry(rid, f"k{i}", usage=cost, reservation=r.dynamic_metadata, tenant=tenant)
                         for i, (rid, r) in enumerate(done)])
            in_flight = [admit(f"f{i}") for i in range(3)]
            assert all(r.overall_code == OK for _, r in in_flight)

            first.stop()  # killed: every counter and reservation is gone
            second = spawn("redis", [_redis_bin(), str(redis_dir / "redis.conf")], tmp_path / "logs")
            wait_until(second, lambda: _pings(url), 15, "Redis to answer again")
            assert redis.Redis.from_url(url).dbsize() == 0

            # The requests in flight finish: ledger rows first, then settlement (their reservations are lost).
            send(audit, [entry(rid, f"f{i}", usage=cost, reservation=r.dynamic_metadata, tenant=tenant)
                         for i, (rid, r) in enumerate(in_flight)])
            with psycopg.connect(dsn) as conn:
                spent = conn.execute("SELECT sum(cost_micro_usd) FROM spend_ledger WHERE tenant = %s",
                                     (tenant,)).fetchone()
            assert spent is not None and spent[0] == 8 * each  # no spend lost

            # The first call after the restart may meet a dead connection (UNAVAILABLE: the budget fails
            # closed); a zero reservation then moves nothing.
            def answers() -> bool:
                try:
                    return stub.ShouldRateLimit(spend_req(0, principal="probe", tenant=tenant)).overall_code == OK
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    return False

            wait_until(svc, answers, 15, "the budget to be checked again")
            after = [admit(f"n{i}") for i in range(3)]
            assert [r.overall_code for _, r in after] == [OK, OK, OVER]  # rebuilt at 8 of 10: the cap holds
    finally:
        first.stop()
        if second is not None:
            second.stop()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def test_a_rebuilt_counter_keeps_what_open_batches_hold(tmp_path: Path, dsn: str, own_redis: str) -> None:
    """A batch create the provider took holds its worst case until its results are metered; after Redis
    loses its data the rebuilt counter holds it too (a metered batch's hold is gone: its results' row counts)."""
    tenant = _name()
    b = Budget(_name(), SubjectKind.TENANT, tenant, Period.MONTH, 10 * W, scope="shared")
    _budget(dsn, b)
    with psycopg.connect(dsn) as conn:
        for rid, endpoint, status, cost, reserved, metered in (
                ("spent", "messages.create", 200, 4 * W, W, None),
                ("open-batch", "batches.create", 200, 0, 3 * W, False),
                ("done-batch", "batches.create", 200, 0, 5 * W, True),
                ("done-results", "batches.results", 200, W, 0, None),
                ("failed-batch", "batches.create", 529, 0, 7 * W, None)):
            conn.execute("INSERT INTO spend_ledger (request_id, ts, principal_id, tenant, endpoint, status, "
                         "cost_micro_usd, reserved_micro_usd) VALUES (%s, now(), 'k1', %s, %s, %s, %s, %s)",
                         (f"{tenant}-{rid}", tenant, endpoint, status, cost, reserved))
            if metered is not None:
                conn.execute("INSERT INTO provider_objects (kind, object_id, provider, owner_principal_id, "
                             "request_count, create_request_id, metered_at) VALUES ('batch', %s, 'anthropic', 'k1', "
                             "2, %s, CASE WHEN %s THEN now() END)", (f"msgbatch_{tenant}{rid}", f"{tenant}-{rid}",
                                                                     metered))
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=own_redis, postgres_dsn=dsn) as svc, \
            grpc.insecure_channel(str(svc.info["address"])) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        # Spent 4 + 1, held 3: two more fit, the third does not.
        got = [stub.ShouldRateLimit(spend_req(W, principal="k2", tenant=tenant)).overall_code for _ in range(3)]
        assert got == [OK, OK, OVER]
        r = redis.Redis.from_url(own_redis)
        assert int(r.get(counter_key(b, "", window(Period.MONTH, "UTC", float(r.time()[0]))))) == 10 * W  # type: ignore[arg-type]


def test_batch_holds_are_released_once_by_their_results_in_either_order(tmp_path: Path, dsn: str,
                                                                          redis_url: str) -> None:
    """A batch create the provider took keeps its reservation as a hold; its results' settlement charges
    their cost and releases the hold, once. The results' entry may reach a receiver before the create's
    (another worker has it): the create's reservation is released then, and there is nothing left to hold."""
    from dataclasses import replace

    from audit.ledger import HOLD_PREFIX

    group = _name()
    b = Budget(_name(), SubjectKind.GROUP, group, Period.DAY, 10 * W, scope="shared")
    _budget(dsn, b)
    r = redis.Redis.from_url(redis_url)
    key = counter_key(b, "", window(Period.DAY, "UTC", float(r.time()[0])))
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=redis_url, postgres_dsn=dsn) as svc, \
            grpc.insecure_channel(str(svc.info["address"])) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)

        def admit(amount: int, charge_only: bool = False) -> tuple[str, rls_pb2.RateLimitResponse]:
            rid = uuid.uuid4().hex
            resp = stub.ShouldRateLimit(spend_req(amount, principal="k", groups=(group,), rid=rid,
                                                  charge_only=charge_only), timeout=10)
            assert resp.overall_code == OK
            return rid, resp

        # In order: create (3 held), its results (cost 1) release the hold.
        create, cresp = admit(3 * W)
        _settle(redis_url, [replace(_settlement(create, cresp, 0), hold=True)])
        assert int(r.get(key)) == 3 * W and r.exists(HOLD_PREFIX + create)  # type: ignore[arg-type]
        results, rresp = admit(0, charge_only=True)
        done = replace(_settlement(results, rresp, W), release=create)
        _settle(redis_url, [done, done])  # re-sent: charged and released once
        assert int(r.get(key)) == W and not r.exists(HOLD_PREFIX + create)  # type: ignore[arg-type]

        # Out of order: the results' entry first, then the create's.
        create2, cresp2 = admit(2 * W)
        results2, rresp2 = admit(0, charge_only=True)
        _settle(redis_url, [replace(_settlement(results2, rresp2, W // 2), release=create2)])
        assert int(r.get(key)) == W + W // 2  # type: ignore[arg-type]
        _settle(redis_url, [replace(_settlement(create2, cresp2, 0), hold=True)])
        assert int(r.get(key)) == W + W // 2 and not r.exists(HOLD_PREFIX + create2)  # type: ignore[arg-type]

        # A create the provider refused settles to 0 (released) like any failed request.
        create3, cresp3 = admit(4 * W)
        _settle(redis_url, [_settlement(create3, cresp3, 0)])
        assert int(r.get(key)) == W + W // 2 and not r.exists(HOLD_PREFIX + create3)  # type: ignore[arg-type]


def test_the_awaited_reservation_holds_the_cap_and_rebuilds_as_the_blocking_one(dsn: str, own_redis: str) -> None:
    """extauth reserves on its event loop (SpendGate.decide_async through one pipelined connection): 200 at
    once against room for 10 admit exactly 10; after Redis loses its counters, they are rebuilt from the
    ledger as the blocking path does."""
    from ccr.config import SpendSettings
    from ratelimit.redis_pipe import RedisPipe
    from ratelimit.spend import make_gate

    tenant = _name()
    b = Budget(_name(), SubjectKind.TENANT, tenant, Period.MONTH, 10 * W, scope="shared")
    _budget(dsn, b)
    r = redis.Redis.from_url(own_redis)
    gate = make_gate(r, dsn, SpendSettings(refresh_s=60))
    assert gate is not None and gate.budgets.index is not None  # read once at start

    async def go() -> None:
        pipe = RedisPipe(own_redis, timeout_s=5)
        try:
            rids = [uuid.uuid4().hex for _ in range(200)]
            out = await asyncio.gather(*(gate.decide_async(spend_req(W, principal=f"k{i}", tenant=tenant, rid=rid),
                                                           pipe) for i, rid in enumerate(rids)))
            admitted = [(rid, resp) for rid, resp in zip(rids, out, strict=True) if resp.overall_code == OK]
            assert len(admitted) == 10 and sum(resp.overall_code == OVER for resp in out) == 190
            with psycopg.connect(dsn) as conn:  # the ledger (the truth) holds 9 of them, settled at their worst case
                for rid, _ in admitted[:9]:
                    conn.execute("INSERT INTO spend_ledger (request_id, ts, principal_id, tenant, status, "
                                 "cost_micro_usd, reserved_micro_usd) VALUES (%s, now(), 'k', %s, 200, %s, %s)",
                                 (rid, tenant, W, W))
            r.flushall()  # Redis loses every counter
            before = gate.rebuilds
            ok = await gate.decide_async(spend_req(W, principal="k2", tenant=tenant), pipe)
            assert ok.overall_code == OK and gate.rebuilds == before + 1
            over = await gate.decide_async(spend_req(W, principal="k3", tenant=tenant), pipe)
            assert over.overall_code == OVER
        finally:
            pipe.close()

    try:
        asyncio.run(go())
        key = counter_key(b, "", window(Period.MONTH, "UTC", float(r.time()[0])))
        assert int(r.get(key)) == 10 * W  # type: ignore[arg-type]
    finally:
        gate.close()
        r.close()
