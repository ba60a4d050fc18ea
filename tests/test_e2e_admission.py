"""Where the request-time limits and budgets are decided (limits.admission), through real Envoy.

`extauth` (the default): inside the ext_authz Check, so Envoy calls the rate limit service only for the
stream-end token charges. `ratelimit`: Envoy asks the rate limit service at the request (stage 0) and,
for a budget, through the `ccr.spend` filter, as a mesh's own Envoy does. Both give the client the same
headers, 429 and 402, and the audit row the same outcome; the store down fails closed the same way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import psycopg.rows
import pytest

from ccr.budgets import Budget, Period, SubjectKind, set_budget
from ccr.contract import H_BUDGET_WARNING
from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests.harness import log_row, running_gateway

MODEL = "claude-sonnet-4-6"
BODY = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
RULES: list[dict[str, Any]] = [
    {"name": "key-rpm", "per": "key", "amount": 3, "unit": "minute"},
    # A token limit: Messages routes then charge metered usage at stream end (one call each).
    {"name": "eng-tokens", "per": "group", "value": "eng", "metric": "tokens", "amount": 1_000_000,
     "unit": "hour"},
]
QUOTA = ("x-ratelimit-", "anthropic-ratelimit-")


def _gateway(tmp_path_factory: pytest.TempPathFactory, admission: str, transport: str | None = None
             ) -> Iterator[Gateway]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["limits"]["rules"] = RULES
        cfg["limits"]["admission"] = admission
        cfg["spend"] = {"refresh_s": 0.1}
        if transport is not None:
            cfg["services"]["authz_transport"] = transport

    with running_gateway(tmp_path_factory.mktemp(f"gw_{admission}_{transport}"), edit) as g:
        yield g


# Decided in extauth's Check, asked over either ext_authz transport: the same answers.
@pytest.fixture(scope="module", params=["grpc", "http"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def in_extauth(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Gateway]:
    yield from _gateway(tmp_path_factory, "extauth", transport)


@pytest.fixture(scope="module")
def in_ratelimit(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Gateway]:
    """A fresh one beside each in_extauth: the group's token counter is shared by the requests a pair makes."""
    del transport  # only to be started anew per transport
    yield from _gateway(tmp_path_factory, "ratelimit")


def _dsn(gw: Gateway) -> str:
    assert gw.runtime is not None
    return gw.runtime.postgres_dsn


def _post(gw: Gateway, key: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/messages", json=BODY, timeout=30,
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01"})


def _ratelimit_calls(gw: Gateway) -> int:
    """Calls Envoy made to the rate limit service (its cluster's request count)."""
    stats = httpx.get(f"{gw.admin_url}/stats", params={"filter": r"^cluster\.ccr_ratelimit\.upstream_rq_total$"},
                      timeout=5).text
    return sum(int(line.split(":")[1]) for line in stats.splitlines() if line.strip())


def _quota(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith(QUOTA) and not k.endswith("-reset")}


def _sequence(gw: Gateway, tag: str) -> tuple[str, list[httpx.Response]]:
    """A fresh key (group eng), then four requests against its limit of 3 per minute."""
    rec, secret = create_key(_dsn(gw), f"adm-{tag}-{uuid.uuid4().hex[:6]}", ["default", "eng"])
    return rec.id, [_post(gw, secret) for _ in range(4)]


def _wait_calls(gw: Gateway, want: int) -> int:
    """Stream-end calls are made after the reply: wait for the count (bounded), then a last look."""
    deadline = time.monotonic() + 10
    while (n := _ratelimit_calls(gw)) < want and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def test_both_paths_answer_alike_and_only_the_old_one_asks_at_the_request(
        in_extauth: Gateway, in_ratelimit: Gateway) -> None:
    before_a, before_b = _ratelimit_calls(in_extauth), _ratelimit_calls(in_ratelimit)
    seen: dict[str, tuple[str, list[httpx.Response]]] = {}
    for name, gw in (("extauth", in_extauth), ("ratelimit", in_ratelimit)):
        seen[name] = _sequence(gw, name)
    for name in seen:
        key_id, rs = seen[name]
        assert [r.status_code for r in rs] == [200, 200, 200, 429], (name, [r.text for r in rs])
    (ka, a), (kb, b) = seen["extauth"], seen["ratelimit"]
    for ra, rb in zip(a, b, strict=True):
        assert _quota(ra) == _quota(rb) and _quota(ra), (_quota(ra), _quota(rb))
        assert {k for k in ra.headers if k.startswith(QUOTA)} == {k for k in rb.headers if k.startswith(QUOTA)}
    # The tightest limit first, then every limit's quota policy (the default per-principal rpm, the key's, the
    # group's tokens), as Envoy's DRAFT_VERSION_03 headers say it.
    assert a[0].headers["x-ratelimit-limit"] == "3, 600;w=60, 3;w=60, 1000000;w=3600"
    assert a[2].headers["x-ratelimit-remaining"] == "0"
    # The 429: the same body (but for the key named), headers and audit outcome.
    ea, eb = a[3].json(), b[3].json()
    assert ea["error"]["type"] == eb["error"]["type"] == "rate_limit_error"
    assert ea["error"]["message"].split(" resets at ")[0].replace(ka, "K") == \
        eb["error"]["message"].split(" resets at ")[0].replace(kb, "K")
    for h in ("retry-after", "content-type", "x-envoy-ratelimited"):
        assert (h in a[3].headers) == (h in b[3].headers), h
    assert 1 <= int(a[3].headers["retry-after"]) <= 61 and a[3].headers["content-type"] == "application/json"
    for gw, rs in ((in_extauth, a), (in_ratelimit, b)):
        row = log_row(_dsn(gw), rs[3].headers["x-request-id"])
        assert (row["status"], row["response_flags"], row["ratelimit"], row["error_kind"], row["error_type"]) == \
            (429, "RL", "over_limit", "rate_limited", "rate_limit_error"), row
        ok = log_row(_dsn(gw), rs[0].headers["x-request-id"])
        assert (ok["response_flags"], ok["ratelimit"]) == (None, "ok")
    # Envoy's calls to the rate limit service: in extauth, the three stream-end charges only; the old
    # path also asks at each of the four requests.
    assert _wait_calls(in_ratelimit, before_b + 7) - before_b == 7
    assert _wait_calls(in_extauth, before_a + 3) - before_a == 3


def _budget(gw: Gateway, micro_usd: int, mode: str) -> str:
    rec, secret = create_key(_dsn(gw), f"adm-b-{uuid.uuid4().hex[:6]}", ["default"])
    with psycopg.connect(_dsn(gw)) as conn:
        set_budget(conn, Budget(f"b-{rec.id}", SubjectKind.KEY, rec.id, Period.DAY, micro_usd, mode=mode), "test")
    return secret


def _until(gw: Gateway, key: str, done: Any) -> httpx.Response:
    deadline = time.monotonic() + 10
    while not done(r := _post(gw, key)):
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    return r


def test_budgets_reserve_in_the_check_and_refuse_with_the_same_402(
        in_extauth: Gateway, in_ratelimit: Gateway) -> None:
    replies = {}
    for name, gw in (("extauth", in_extauth), ("ratelimit", in_ratelimit)):
        soft = _budget(gw, 1, "soft")  # any request passes a soft budget, with a warning past 80 %
        warned = _until(gw, soft, lambda r: H_BUDGET_WARNING in r.headers)
        assert warned.status_code == 200
        before = _ratelimit_calls(gw)
        hard = _budget(gw, 1, "hard")  # less than any request's worst case
        refused = _until(gw, hard, lambda r: r.status_code == 402)
        replies[name] = (warned, refused, before)
    (wa, ra, _), (wb, rb, _) = replies["extauth"], replies["ratelimit"]
    assert ra.json()["error"]["type"] == rb.json()["error"]["type"] == "billing_error"
    assert {k for k in ra.headers if k.startswith(("ccr-budget", "retry-after"))} == \
        {k for k in rb.headers if k.startswith(("ccr-budget", "retry-after"))}
    for gw, r in ((in_extauth, ra), (in_ratelimit, rb)):
        row = log_row(_dsn(gw), r.headers["x-request-id"])
        assert (row["status"], row["response_flags"], row["ratelimit"], row["error_kind"]) == \
            (402, "RL", "budget", "budget"), row
        ok = _ledger(_dsn(gw), wa.headers["x-request-id"] if gw is in_extauth else wb.headers["x-request-id"])
        assert ok["reserved_micro_usd"] is not None and ok["reserved_micro_usd"] > 0, ok


def _ledger(dsn: str, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        while (row := cur.execute("SELECT * FROM spend_ledger WHERE request_id = %s", (request_id,)).fetchone()) \
                is None:
            assert time.monotonic() < deadline, f"no spend_ledger row for {request_id}"
            time.sleep(0.05)
    return row


def _metric(gw: Gateway, service: str, needle: str) -> float:
    assert gw.runtime is not None
    total = 0.0
    for name, addr in gw.runtime.metrics.items():
        if name.split(".")[0] != service:
            continue
        for line in httpx.get(f"http://{addr}/metrics", timeout=5).text.splitlines():
            if line.startswith(needle):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_decisions_are_counted_by_the_process_that_makes_them(in_extauth: Gateway) -> None:
    ok = 'ccr_ratelimit_decisions_total{domain="limits",result="ok"}'
    over = 'ccr_ratelimit_decisions_total{domain="limits",result="over_limit"}'
    before = (_metric(in_extauth, "extauth", ok), _metric(in_extauth, "extauth", over))
    _, rs = _sequence(in_extauth, "metrics")
    assert [r.status_code for r in rs] == [200, 200, 200, 429]
    assert (_metric(in_extauth, "extauth", ok) - before[0], _metric(in_extauth, "extauth", over) - before[1]) == \
        (3, 1)
    # Budgets too (the 402s and warnings of the test above): counted by extauth, never by the service,
    # whose only calls are the stream-end charges.
    assert _metric(in_extauth, "extauth", 'ccr_ratelimit_decisions_total{domain="budgets",result="over_limit"}') >= 1
    assert _metric(in_extauth, "extauth", 'ccr_ratelimit_decisions_total{domain="budgets",result="ok"}') >= 1
    assert _metric(in_extauth, "ratelimit", 'ccr_ratelimit_decisions_total{domain="budgets"') == 0


def test_store_down_fails_closed_with_the_rate_limit_services_503(in_extauth: Gateway) -> None:
    """Last in this module: it stops the gateway's Redis."""
    rec, secret = create_key(_dsn(in_extauth), f"adm-down-{uuid.uuid4().hex[:6]}", ["default", "eng"])
    assert _post(in_extauth, secret).status_code == 200
    redis_child = next(c for c in in_extauth.children if c.name.split(".")[0] == "redis")
    redis_child.stop()
    r = _post(in_extauth, secret)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["type"] == "api_error" and err["message"] == \
        "The gateway's rate limit service is unavailable; retry shortly."
    row = log_row(_dsn(in_extauth), r.headers["x-request-id"])
    assert (row["response_flags"], row["ratelimit"], row["usage_status"]) == ("RLSE", "error", "not_forwarded"), row
