"""ccr's own limits through the whole gateway: real Envoy, extauth, ratelimit, Redis, the emulator,
and the official anthropic SDK. Remaining-quota headers on replies, the Anthropic-shaped 429
naming the limit, a group limit, and a token limit checked before the call and charged at stream end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
import redis

from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests.harness import log_row, running_gateway

MODEL = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "hello"}]
TOKENS_PER_HOUR = 20

RULES: list[dict[str, Any]] = [
    {"name": "key-rpm", "per": "key", "amount": 3, "unit": "minute"},
    {"name": "eater-tokens", "per": "group", "value": "token-eaters", "metric": "tokens", "amount": TOKENS_PER_HOUR,
     "unit": "hour"},
    {"name": "interns", "per": "group", "value": "interns", "amount": 1, "unit": "hour"},
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["limits"]["rules"] = RULES
        cfg["limits"]["tokens"] = {"input": 1, "output": 1, "cache_read": 0}

    with running_gateway(tmp_path_factory.mktemp("gw_limits"), edit) as g:
        yield g


def _dsn(gw: Gateway) -> str:
    assert gw.runtime is not None
    return gw.runtime.postgres_dsn


def _client(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)


def test_replies_carry_remaining_quota_and_429_names_the_limit(gw: Gateway) -> None:
    rec, key = create_key(_dsn(gw), "quota-headers", ["default"])
    c = _client(gw, key)
    for i in range(3):
        raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=HELLO)
        h = raw.headers
        assert raw.parse().content
        # Envoy's, from the descriptor statuses (the tightest: key-rpm)
        assert h["x-ratelimit-limit"].split(",")[0] == "3"
        assert h["x-ratelimit-remaining"] == str(2 - i)
        assert 1 <= int(h["x-ratelimit-reset"]) <= 61
        # the service's, Anthropic's names
        assert h["anthropic-ratelimit-requests-limit"] == "3"
        assert h["anthropic-ratelimit-requests-remaining"] == str(2 - i)
        assert h["anthropic-ratelimit-requests-reset"].endswith("Z")
        assert "anthropic-ratelimit-tokens-limit" not in h  # no token limit applies to this key
    with pytest.raises(anthropic.RateLimitError) as e:
        c.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    h = e.value.response.headers
    assert e.value.status_code == 429 and 1 <= int(h["retry-after"]) <= 61
    assert h["x-ratelimit-remaining"] == "0" and h["anthropic-ratelimit-requests-remaining"] == "0"
    err = e.value.body["error"]  # type: ignore[index]
    assert err["type"] == "rate_limit_error"
    assert err["message"].startswith(f"Rate limit 'key-rpm' of 3 requests per minute exceeded for API key {rec.id}; "
                                     "resets at ")
    assert f"retry after {h['retry-after']} seconds" in err["message"]
    row = log_row(_dsn(gw), h["x-request-id"])
    assert row["status"] == 429 and row["response_flags"] == "RL"


def test_group_limit_applies_to_its_members_only(gw: Gateway) -> None:
    _, intern = create_key(_dsn(gw), "an-intern", ["default", "interns"])
    _, staff = create_key(_dsn(gw), "staff", ["default"])
    assert _client(gw, intern).messages.create(model=MODEL, max_tokens=8, messages=HELLO).content
    with pytest.raises(anthropic.RateLimitError) as e:
        _client(gw, intern).messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    assert "'interns' of 1 request per hour exceeded for group interns" in e.value.body["error"]["message"]  # type: ignore[index]
    for _ in range(2):
        assert _client(gw, staff).messages.create(model=MODEL, max_tokens=8, messages=HELLO).content


def _charged(gw: Gateway) -> int:
    assert gw.runtime is not None
    with redis.Redis.from_url(gw.runtime.redis_url) as rc:
        total = rc.hget("ccr:rl:rule:eater-tokens:sliding_window.2:hour:group=token-eaters", "s")
    return int(total or 0)  # the window's running sum (ratelimit/counters.py)


def test_token_limit_checked_before_the_call_and_charged_at_stream_end(gw: Gateway) -> None:
    _, key = create_key(_dsn(gw), "token-eater", ["default", "token-eaters"])
    c = _client(gw, key)
    with c.messages.with_streaming_response.create(model=MODEL, max_tokens=200, stream=True, messages=[
            {"role": "user", "content": "Write four sentences about rate limits."}]) as raw:
        h = raw.headers
        # Checked before the call: the whole budget is there, and nothing is taken at the start.
        assert h["anthropic-ratelimit-tokens-limit"] == str(TOKENS_PER_HOUR)
        assert h["anthropic-ratelimit-tokens-remaining"] == str(TOKENS_PER_HOUR)
        events = list(raw.parse())
    final = next(ev for ev in reversed(events) if ev.type == "message_delta")
    start = next(ev for ev in events if ev.type == "message_start")
    used = start.message.usage.input_tokens + final.usage.output_tokens
    assert used > TOKENS_PER_HOUR
    # Envoy charges after the reply ends: wait for that, then the budget is spent.
    deadline = time.monotonic() + 15
    while _charged(gw) == 0:
        assert time.monotonic() < deadline, "no charge at stream end"
        time.sleep(0.05)
    assert _charged(gw) == used  # input + output, as metered
    with pytest.raises(anthropic.RateLimitError) as e:
        c.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    h = e.value.response.headers
    assert h["anthropic-ratelimit-tokens-remaining"] == "0" and int(h["retry-after"]) > 60
    assert e.value.body["error"]["message"].startswith(  # type: ignore[index]
        f"Rate limit 'eater-tokens' of {TOKENS_PER_HOUR} tokens per hour exceeded for group token-eaters; resets at ")
