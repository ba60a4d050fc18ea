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
    assert re.search(rf"{key_id.group(1)} .* revoked ", capsys.readouterr().out)
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
