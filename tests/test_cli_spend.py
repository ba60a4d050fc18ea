"""`ccr spend report` and `ccr budgets list|set|remove` against a configured database."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml

from audit.chain import ADMIN_CHAIN
from audit.verify import verify
from ccr import db
from ccr.cli import main
from tests.harness import create_database

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def dsn(postgres_server: dict[str, object]) -> str:
    d = create_database(str(postgres_server["admin_dsn"]), "cli")
    db.migrate(d)
    return d


def _config(tmp_path: Path, dsn: str) -> str:
    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    cfg["storage"]["data_dir"] = str(tmp_path / "data")
    cfg["storage"]["postgres_dsn"] = dsn
    path = tmp_path / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _ledger(dsn: str, rows: list[tuple[str, datetime, str, str | None, list[str], str, int]]) -> None:
    with psycopg.connect(dsn) as conn:
        for rid, ts, principal, key, groups, model, cost in rows:
            conn.execute("INSERT INTO spend_ledger (request_id, ts, principal_id, principal_kind, key_id, groups, "
                         "model, status, input_tokens, output_tokens, cost_micro_usd) "
                         "VALUES (%s, %s, %s, 'key', %s, %s, %s, 200, 10, 20, %s)",
                         (rid, ts, principal, key, groups, model, cost))


def test_spend_report_by_each_dimension_and_format(tmp_path: Path, dsn: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, dsn)
    now = datetime.now(UTC)
    old = datetime(2025, 1, 15, 12, tzinfo=UTC)
    _ledger(dsn, [("r1", now, "key_a", "key_a", ["eng"], "claude-sonnet-4-6", 1_500_000),
                  ("r2", now, "key_a", "key_a", ["eng", "ops"], "claude-haiku-4-5", 250_000),
                  ("r3", now, "key_b", "key_b", [], "claude-sonnet-4-6", 10),
                  ("r4", old, "key_b", "key_b", ["eng"], "claude-sonnet-4-6", 7_000_000)])
    assert main(["-c", cfg, "spend", "report", "--by", "user", "--period", "month"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "total_usd: 1.750010" in lines[0]
    assert lines[2].split()[0] == "key_a" and lines[2].split()[-1] == "1.750000"
    assert lines[3].split()[0] == "key_b" and lines[3].split()[-1] == "0.000010"

    assert main(["-c", cfg, "spend", "report", "--by", "group", "--period", "day", "--format", "csv"]) == 0
    got = {r["group"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert {k: v["cost_usd"] for k, v in got.items()} == {"eng": "1.750000", "ops": "0.250000", "-": "0.000010"}

    assert main(["-c", cfg, "spend", "report", "--by", "model", "--period", "2025-01-01..2025-01-31",
                 "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"] == [{"model": "claude-sonnet-4-6", "requests": 1, "input_tokens": 10, "output_tokens": 20,
                            "cache_write_tokens": 0, "cache_read_tokens": 0, "cost_micro_usd": 7_000_000,
                            "cost_usd": "7.000000"}]
    assert main(["-c", cfg, "spend", "report", "--by", "key", "--period", "2025-02-01..2025-01-01"]) == 2


def test_budgets_set_list_remove_with_current_spend_and_admin_log(tmp_path: Path, dsn: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, dsn)
    # A group budget must say whether it is a pool or per seat.
    assert main(["-c", cfg, "budgets", "set", "eng-daily", "--group", "eng", "--period", "day",
                 "--amount", "20"]) == 2
    assert "per_seat" in capsys.readouterr().err
    assert main(["-c", cfg, "budgets", "set", "eng-daily", "--group", "eng", "--period", "day", "--amount", "20",
                 "--scope", "shared", "--actor", "alice"]) == 0
    assert "created budget eng-daily: group:eng $20.000000 per day" in capsys.readouterr().out
    assert main(["-c", cfg, "budgets", "set", "eng-daily", "--group", "eng", "--period", "day", "--amount", "25",
                 "--scope", "shared", "--mode", "soft", "--actor", "bob"]) == 0
    assert "updated budget" in capsys.readouterr().out
    _ledger(dsn, [("x1", datetime.now(UTC), "key_a", "key_a", ["eng"], "m", 5_000_000),
                  ("x2", datetime.now(UTC) - timedelta(days=3), "key_a", "key_a", ["eng"], "m", 9_000_000)])
    assert main(["-c", cfg, "budgets", "list", "--format", "json"]) == 0
    (b,) = json.loads(capsys.readouterr().out)["rows"]
    assert (b["name"], b["amount_usd"], b["mode"], b["spent_micro_usd"], b["used"]) == (
        "eng-daily", "25.000000", "soft", 5_000_000, "20.0%")
    assert main(["-c", cfg, "budgets", "remove", "eng-daily", "--actor", "carol"]) == 0
    assert main(["-c", cfg, "budgets", "remove", "eng-daily"]) == 1
    with psycopg.connect(dsn) as conn:
        log = conn.execute("SELECT actor, action, before->>'amount_micro_usd', after->>'amount_micro_usd', chain_id "
                           "FROM admin_log WHERE target = 'budget:eng-daily' ORDER BY id").fetchall()
    assert log == [("alice", "budget.create", None, "20000000", ADMIN_CHAIN),
                   ("bob", "budget.update", "20000000", "25000000", ADMIN_CHAIN),
                   ("carol", "budget.remove", "25000000", None, ADMIN_CHAIN)]
    # Links of the admin hash chain: `ccr audit verify` finds nothing inserted outside it.
    assert verify(dsn, []).problems == []
