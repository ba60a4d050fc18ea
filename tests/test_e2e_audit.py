"""`ccr up`'s audit trail end to end: the receiver writes as the insert-only role, the chain
verifies with the key `ccr up` created, and Envoy's access-log drop counter is readable."""

from __future__ import annotations

import re
import time

import httpx
import psycopg
import pytest

from ccr.audit_role import AUDIT_ROLE
from ccr.cli import main
from ccr.supervisor import Gateway


def _count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        (n,) = conn.execute("SELECT count(*) FROM request_log WHERE chain_id IS NOT NULL").fetchone() or (0,)
    return int(n)


def test_gateway_audit_trail(gw: Gateway, dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert gw.runtime is not None and gw.runtime.audit_dsn and gw.runtime.audit_dir
    before = _count(dsn)
    for _ in range(3):
        r = httpx.post(f"{gw.url}/v1/messages", timeout=30, json={
            "model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01"})
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while _count(dsn) < before + 3:
        assert time.monotonic() < deadline, "the requests' rows did not arrive"
        time.sleep(0.05)

    with psycopg.connect(dsn) as conn:
        users = {u for (u,) in conn.execute(
            "SELECT usename FROM pg_stat_activity WHERE application_name = 'ccr-audit'")}
    assert users == {AUDIT_ROLE}
    key = gw.data_dir() / "audit" / "signing.key"
    assert key.stat().st_mode & 0o777 == 0o600

    stats = httpx.get(f"{gw.admin_url}/stats", params={"filter": "access_logs.grpc_access_log"}).text
    written = re.search(r"access_logs\.grpc_access_log\.logs_written: (\d+)", stats)
    assert written is not None and int(written[1]) >= 3, stats
    assert re.search(r"access_logs\.grpc_access_log\.logs_dropped: 0\b", stats), stats

    capsys.readouterr()
    code = main(["audit", "verify", "-c", str(gw.config_path)])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("OK: "), out
