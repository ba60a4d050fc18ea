"""Budgets end to end: real Envoy, extauth, ratelimit, the emulator, the access log, PostgreSQL, Redis,
driven by the anthropic SDK. Reserve at admission, 402 naming the budget, count_tokens never blocked,
settlement to the metered cost, the ledger row, the soft-budget warning header."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import psycopg
import pytest
import redis

from audit.ledger import Spend
from ccr.budgets import Budget, Period, SubjectKind, counter_key, set_budget, window
from ccr.config import Price
from ccr.contract import H_BUDGET, H_BUDGET_WARNING
from ccr.pricing import Rates, Usage, batch_worst_case_micro, cost_micro, worst_case_micro
from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests.harness import emulator_mark, log_row, running_gateway

MODEL = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "hello"}]
SONNET = Rates.of(Price(input=3, output=15, cache_write=3.75, cache_write_1h=6, cache_read=0.3))
# A probe whose worst case is over every budget these tests set, inside the shipped policies'
# standard tier (max_tokens <= 128000, request <= 32 MiB): most of its worst case is its size.
PROBE = {"model": MODEL, "max_tokens": 128_000, "system": "x" * 1_000_000, "messages": []}
PROBE_WORST = worst_case_micro(SONNET, len(json.dumps(PROBE)), 128_000)


# Claude Haiku 5.5's rates (USD per million tokens), with the long-context threshold brought down from 100,000
# prompt tokens to 200, so that a small request crosses it.
LONG_MODEL = "claude-haiku-5-5"
LONG_OVER = 200
LONG_PRICE = {"input": 0.10, "output": 0.50, "cache_write": 0.125, "cache_write_1h": 0.20, "cache_read": 0.01,
              "long_context": {"over_prompt_tokens": LONG_OVER, "input": 0.50, "output": 2.50, "cache_write": 0.625,
                               "cache_write_1h": 1.0, "cache_read": 0.05}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["spend"] = {"refresh_s": 0.1}
        cfg["models"].insert(0, {"match": LONG_MODEL, "provider": "anthropic", "price": LONG_PRICE})

    with running_gateway(tmp_path_factory.mktemp("gw"), edit) as g:
        yield g


def _key(gw: Gateway, budget_usd_micro: int, mode: str = "hard") -> tuple[str, Budget]:
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    assert budget_usd_micro < PROBE_WORST  # else the probe could not see a hard budget come into force
    rec, secret = create_key(dsn, f"spend-{uuid.uuid4().hex[:6]}", ["default"])
    b = Budget(f"b-{rec.id}", SubjectKind.KEY, rec.id, Period.DAY, budget_usd_micro, mode=mode)
    with psycopg.connect(dsn) as conn:
        set_budget(conn, b, "test")
    _until_in_force(gw, secret, mode == "hard")
    return secret, b


def _until_in_force(gw: Gateway, key: str, hard: bool) -> None:
    """extauth and ratelimit re-read budgets every refresh_s: probe through the gateway until the new
    budget is in force. The probe is refused by the provider (no messages: 400, bills nothing) unless
    the budget refuses it first (hard: 402) or warns (soft: the header)."""
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(f"{gw.url}/v1/messages", json=PROBE, timeout=30,
                       headers={"x-api-key": key, "anthropic-version": "2023-06-01"})
        if (r.status_code == 402) if hard else (H_BUDGET_WARNING in r.headers):
            return
        assert r.status_code == 400, r.text
        assert time.monotonic() < deadline, "the budget never came into force"
        time.sleep(0.05)


def _client(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)


def ledger(dsn: str, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        while True:
            cur.execute("SELECT * FROM spend_ledger WHERE request_id = %s", (request_id,))
            row = cur.fetchone()
            if row is not None:
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"no spend_ledger row for {request_id}")
            time.sleep(0.05)


def test_a_hard_budget_refuses_with_402_naming_it_and_count_tokens_still_passes(gw: Gateway) -> None:
    key, b = _key(gw, 1_000)  # $0.001: less than any request's worst case
    c = _client(gw, key)
    with pytest.raises(anthropic.APIStatusError) as e:
        c.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    err = e.value
    assert err.status_code == 402
    body = err.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "billing_error"
    assert b.name in body["error"]["message"] and "resets at" in body["error"]["message"]
    assert err.response.headers[H_BUDGET] == b.name and int(err.response.headers["retry-after"]) >= 1
    # count_tokens is never blocked by a budget.
    n = c.messages.count_tokens(model=MODEL, messages=HELLO)
    assert n.input_tokens > 0
    assert gw.runtime is not None
    row = log_row(gw.runtime.postgres_dsn, err.response.headers["x-request-id"])
    assert row["status"] == 402 and row["usage_status"] == "not_forwarded"


def test_admitted_requests_settle_to_their_metered_cost(gw: Gateway) -> None:
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    key, b = _key(gw, 5_000_000)  # $5
    c = _client(gw, key)
    with c.messages.stream(model=MODEL, max_tokens=256, messages=HELLO) as s:
        msg = s.get_final_message()
        rid = s.response.headers["x-request-id"]
    row = ledger(dsn, rid)
    u = msg.usage
    expected = -(-(u.input_tokens * 3_000_000 + u.output_tokens * 15_000_000) // 1_000_000)
    assert row["cost_micro_usd"] == expected > 0
    assert row["model"] == MODEL and row["key_id"] == b.subject and row["usage_status"] == "complete"
    assert row["reserved_micro_usd"] is not None and row["reserved_micro_usd"] >= row["cost_micro_usd"]
    r = redis.Redis.from_url(gw.runtime.redis_url)
    ckey = counter_key(b, "", window(Period.DAY, "UTC", float(r.time()[0])))
    deadline = time.monotonic() + 10
    while int(r.get(ckey) or 0) != expected:  # settled: reserved worst case -> actual cost
        assert time.monotonic() < deadline, f"counter {r.get(ckey)!r}, expected {expected}"
        time.sleep(0.05)


def test_a_long_prompt_settles_at_the_long_context_rates_and_a_short_one_at_the_base_rates(gw: Gateway) -> None:
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    key, _ = _key(gw, 5_000_000)
    c = _client(gw, key)
    prompts = []
    for words in (5, 2000):
        raw = c.messages.with_raw_response.create(model=LONG_MODEL, max_tokens=64,
                                                  messages=[{"role": "user", "content": "hello " * words}])
        u = raw.parse().usage
        prompt = u.input_tokens + (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)
        prompts.append(prompt)
        # pico-USD per token: 0.10 / 0.50 USD per MTok, or past the threshold 0.50 / 2.50.
        per_in, per_out = (500_000, 2_500_000) if prompt > LONG_OVER else (100_000, 500_000)
        expected = -(-(u.input_tokens * per_in + u.output_tokens * per_out) // 1_000_000)
        row = ledger(dsn, raw.headers["x-request-id"])
        assert row["model"] == LONG_MODEL and row["cost_micro_usd"] == expected > 0, (prompt, row)
        assert row["reserved_micro_usd"] >= row["cost_micro_usd"]  # the worst case covered it
    assert prompts[0] <= LONG_OVER < prompts[1]


def test_a_soft_budget_admits_with_a_warning_header(gw: Gateway) -> None:
    key, b = _key(gw, 1_000, mode="soft")
    c = _client(gw, key)
    raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=32, messages=HELLO)
    assert raw.status_code == 200 and b.name in raw.headers[H_BUDGET_WARNING]
    assert raw.parse().content[0].text


def _counter(gw: Gateway, b: Budget) -> tuple[redis.Redis, str]:
    assert gw.runtime is not None
    r = redis.Redis.from_url(gw.runtime.redis_url)
    return r, counter_key(b, "", window(Period.DAY, "UTC", float(r.time()[0])))


def _wait_counter(r: redis.Redis, key: str, want: int) -> None:
    deadline = time.monotonic() + 10
    while int(r.get(key) or 0) != want:
        assert time.monotonic() < deadline, f"counter {r.get(key)!r}, expected {want}"
        time.sleep(0.05)


def test_a_failed_request_releases_its_reservation(gw: Gateway) -> None:
    assert gw.runtime is not None
    key, b = _key(gw, 5_000_000)
    c = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, default_headers={"x-emulator-fault": "529"})
    with pytest.raises(anthropic.APIStatusError) as e:
        c.messages.create(model=MODEL, max_tokens=1000, messages=HELLO)
    assert e.value.status_code == 529
    row = ledger(gw.runtime.postgres_dsn, e.value.response.headers["x-request-id"])
    assert row["cost_micro_usd"] == 0 and row["reserved_micro_usd"] > 15_000  # 1000 output tokens reserved
    r, ckey = _counter(gw, b)
    _wait_counter(r, ckey, 0)  # released


def test_an_aborted_stream_is_billed_for_what_it_produced(gw: Gateway) -> None:
    assert gw.runtime is not None
    key, b = _key(gw, 5_000_000)
    c = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0,
                            default_headers={"x-emulator-fault": "midstream-error", "x-emulator-output-tokens": "200"})
    with pytest.raises(anthropic.APIStatusError), c.messages.stream(  # noqa: PT012
            model=MODEL, max_tokens=500, messages=HELLO) as stream:
        rid = stream.response.headers["x-request-id"]
        for _ in stream:
            pass
    row = ledger(gw.runtime.postgres_dsn, rid)
    assert row["usage_status"] == "estimated" and row["output_tokens"] > 0
    expected = -(-(row["input_tokens"] * 3_000_000 + row["output_tokens"] * 15_000_000) // 1_000_000)
    assert 0 < row["cost_micro_usd"] == expected < row["reserved_micro_usd"]
    r, ckey = _counter(gw, b)
    _wait_counter(r, ckey, expected)


def test_concurrent_requests_through_the_gateway_never_spend_past_the_cap(gw: Gateway) -> None:
    from concurrent.futures import ThreadPoolExecutor

    assert gw.runtime is not None
    body = json.dumps({"model": MODEL, "max_tokens": 2000, "messages": HELLO}).encode()
    worst = worst_case_micro(SONNET, len(body), 2000)
    key, b = _key(gw, 5 * worst)  # room for 5 worst cases
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"}

    def call(_: int) -> httpx.Response:
        return httpx.post(f"{gw.url}/v1/messages", content=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(40) as pool:
        replies = list(pool.map(call, range(40)))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 402} and codes.count(200) >= 5, codes
    ok = [r.headers["x-request-id"] for r in replies if r.status_code == 200]
    rows = [ledger(gw.runtime.postgres_dsn, rid) for rid in ok]
    spent = sum(r["cost_micro_usd"] for r in rows)
    assert 0 < spent <= b.amount_micro_usd
    r, ckey = _counter(gw, b)
    _wait_counter(r, ckey, spent)  # every reservation settled to its actual cost


def _batch(n: int, max_tokens: int, tag: str) -> bytes:
    return json.dumps({"requests": [
        {"custom_id": f"{tag}{i}", "params": {"model": MODEL, "max_tokens": max_tokens,
                                              "messages": [{"role": "user", "content": f"hello {i}"}]}}
        for i in range(n)]}).encode()


def _post_batch(gw: Gateway, key: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/messages/batches", content=body, timeout=30,
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01",
                               "content-type": "application/json", **headers})


def test_a_batch_create_reserves_its_whole_worst_case_at_the_batch_discount(gw: Gateway) -> None:
    assert gw.runtime is not None
    body = _batch(3, 1000, "a")
    worst = batch_worst_case_micro([(SONNET, 1000)] * 3, len(body))
    # Every request's output at the batch discount: more than one request's worst case, less than 3 full ones.
    assert worst_case_micro(SONNET, len(body), 1000) < worst < 3 * worst_case_micro(SONNET, len(body), 1000)

    key, b = _key(gw, worst - 1)  # one micro-dollar short of the whole batch
    mark = emulator_mark(gw)
    r = _post_batch(gw, key, body)
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert err["type"] == "billing_error" and b.name in err["message"] and "resets at" in err["message"]
    assert r.headers[H_BUDGET] == b.name and int(r.headers["retry-after"]) >= 1
    assert mark.arrived() == [], "a batch over its budget reached the provider"
    rc, ckey = _counter(gw, b)
    assert int(rc.get(ckey) or 0) == 0  # a refusal reserves nothing


def test_a_batch_is_held_at_its_worst_case_until_its_results_settle_it(gw: Gateway) -> None:
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    body = _batch(2, 500, "h")
    worst = batch_worst_case_micro([(SONNET, 500)] * 2, len(body))
    key, b = _key(gw, 10 * worst)
    r, ckey = _counter(gw, b)

    # A create the provider refuses releases what it reserved.
    failed = _post_batch(gw, key, body, **{"x-emulator-fault": "529"})
    assert failed.status_code == 529
    row = ledger(dsn, failed.headers["x-request-id"])
    assert (row["endpoint"], row["cost_micro_usd"], row["reserved_micro_usd"]) == ("batches.create", 0, worst)
    _wait_counter(r, ckey, 0)

    created = _post_batch(gw, key, body)
    assert created.status_code == 200, created.text
    rid, batch_id = created.headers["x-request-id"], created.json()["id"]
    row = ledger(dsn, rid)  # creating bills nothing; the whole batch's worst case stays reserved
    assert (row["endpoint"], row["cost_micro_usd"], row["reserved_micro_usd"]) == ("batches.create", 0, worst)
    hold = f"ccr:spend:h:{rid}"
    deadline = time.monotonic() + 10
    while not r.exists(hold):
        assert time.monotonic() < deadline, "the create's reservation never became a hold"
        time.sleep(0.05)
    assert int(r.get(ckey) or 0) == worst

    # The results (first fetch: metered) are charged at the batch discount and release the hold.
    res = httpx.get(f"{gw.url}/v1/messages/batches/{batch_id}/results", timeout=30,
                    headers={"x-api-key": key, "anthropic-version": "2023-06-01"})
    assert res.status_code == 200
    usages = [json.loads(x)["result"]["message"]["usage"] for x in res.text.splitlines() if x]
    assert len(usages) == 2
    # Results name no model in their access-log entry: priced at the dearest configured model (docs/spend.md).
    dear = Spend(gw.config).rates(None)
    cost = cost_micro(Usage(sum(u["input_tokens"] for u in usages), sum(u["output_tokens"] for u in usages)), dear,
                      batch=True)
    rrow = ledger(dsn, res.headers["x-request-id"])
    assert rrow["endpoint"] == "batches.results" and rrow["batch"] and rrow["cost_micro_usd"] == cost > 0
    _wait_counter(r, ckey, cost)
    assert not r.exists(hold)
    # A second fetch is not metered again and releases nothing more.
    again = httpx.get(f"{gw.url}/v1/messages/batches/{batch_id}/results", timeout=30,
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01"})
    assert again.status_code == 200
    assert ledger(dsn, again.headers["x-request-id"])["cost_micro_usd"] == 0
    assert int(r.get(ckey) or 0) == cost
