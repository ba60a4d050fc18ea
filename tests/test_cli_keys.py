"""`ccr keys create|list|revoke` against a configured DSN and against embedded PostgreSQL."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import psycopg
import pytest
import yaml

from ccr.cli import main

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, dsn: str | None) -> str:
    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    cfg["storage"]["data_dir"] = str(tmp_path / "data")
    if dsn:
        cfg["storage"]["postgres_dsn"] = dsn
    path = tmp_path / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _lifecycle(config: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    assert main(["-c", config, "keys", "create", "ci-bot", "--group", "haiku-only", "--rpm", "30"]) == 0
    out = capsys.readouterr().out
    key_id = re.search(r"created (key_[0-9a-f]+) \(ci-bot\) groups=haiku-only rpm=30", out)
    secret = re.search(r"API key \(shown once, stored only as a hash\): (ccr_\S+)", out)
    assert key_id and secret, out
    assert main(["-c", config, "keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id.group(1) in listing and secret.group(1) not in listing
    assert main(["-c", config, "keys", "revoke", key_id.group(1)]) == 0
    assert capsys.readouterr().out == f"revoked {key_id.group(1)}\n"
    assert main(["-c", config, "keys", "list"]) == 0
    assert key_id.group(1) not in capsys.readouterr().out
    assert main(["-c", config, "keys", "list", "--all"]) == 0
    assert re.search(rf"^{key_id.group(1)} .* revoked$", capsys.readouterr().out, re.M)
    assert main(["-c", config, "keys", "revoke", key_id.group(1)]) == 1
    return key_id.group(1), secret.group(1)


def test_keys_with_configured_dsn(tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    key_id, secret = _lifecycle(_config(tmp_path, postgres_dsn), capsys)
    with psycopg.connect(postgres_dsn) as conn:
        stored = conn.execute("SELECT key_hash FROM api_keys WHERE id = %s", (key_id,)).fetchone()
    assert stored is not None and bytes(stored[0]) == hashlib.sha256(secret.encode()).digest()


def test_keys_with_embedded_postgres(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _lifecycle(_config(tmp_path, None), capsys)
    # The embedded server was started for the command and stopped after it.
    assert not (tmp_path / "data" / "pgdata" / "postmaster.pid").exists()


def test_owner_tenant_expiry_rotation_and_admin_log(
    tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, postgres_dsn)
    assert main(["-c", config, "keys", "create", "etl", "--owner", "data-team", "--tenant", "acme",
                 "--expires-in", "30d", "--actor", "alice"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"created (key_[0-9a-f]+) \(etl\) .* owner=data-team tenant=acme expires=(\S+ \S+)", out)
    assert m, out
    old_id = m.group(1)
    with psycopg.connect(postgres_dsn) as conn:
        owner, tenant, days = conn.execute(
            "SELECT owner, tenant, extract(epoch FROM expires_at - created_at) / 86400 FROM api_keys WHERE id = %s",
            (old_id,)).fetchone()
    assert (owner, tenant) == ("data-team", "acme") and abs(float(days) - 30) < 0.01

    assert main(["-c", config, "keys", "rotate", old_id, "--grace", "1h", "--actor", "bob"]) == 0
    out = capsys.readouterr().out
    new = re.search(r"created (key_[0-9a-f]+) \(etl\) .* owner=data-team tenant=acme", out)
    assert new and f"rotated {old_id}: it stays valid until" in out, out
    assert main(["-c", config, "keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"^{old_id} .* rotated to {new.group(1)}$", listing, re.M), listing
    assert re.search(rf"^{new.group(1)} .* active$", listing, re.M), listing
    # A key is rotated once; the successor is what rotates next.
    assert main(["-c", config, "keys", "rotate", old_id]) == 1
    assert f"already rotated to {new.group(1)}" in capsys.readouterr().err

    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute("SELECT actor, action, after->'new'->>'id' FROM admin_log WHERE target = %s ORDER BY id",
                            (old_id,)).fetchall()
    assert rows == [("alice", "key.create", None), ("bob", "key.rotate", new.group(1))]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["create", "x", "--expires-in", "soon"], "invalid duration 'soon'"),
        (["create", "x", "--expires-at", "2027-01-01T00:00:00"], "has no UTC offset"),
        (["create", "x", "--expires-at", "2001-01-01T00:00:00Z"], "must be a future time"),
        (["rotate", "key_000000000000", "--grace=-1h"], "invalid duration '-1h'"),
    ],
)
def test_bad_expiry_and_grace_are_refused(tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str],
                                          argv: list[str], needle: str) -> None:
    config = _config(tmp_path, postgres_dsn)
    with psycopg.connect(postgres_dsn) as conn:
        before = conn.execute("SELECT count(*) FROM api_keys").fetchone()
    assert main(["-c", config, "keys", *argv]) == 2
    assert needle in capsys.readouterr().err
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM api_keys").fetchone() == before


def test_rotate_unknown_key(tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", _config(tmp_path, postgres_dsn), "keys", "rotate", "key_000000000000"]) == 1
    assert "no key with id key_000000000000" in capsys.readouterr().err
