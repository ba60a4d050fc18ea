import re
import stat
from pathlib import Path

import psycopg
import pytest
import redis

from ccr.localservers import password_file, redact_url, start_postgres, start_redis


def test_postgres_fixture_has_schema(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert {"api_keys", "request_log", "schema_migrations"} <= tables


def test_migrate_is_idempotent(postgres_dsn: str) -> None:
    from ccr import db

    assert db.migrate(postgres_dsn) == db.migrate(postgres_dsn) == max(v for v, _, _ in db.MIGRATIONS)


def test_redis_fixture_answers(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.set("ccr:test", "1")
    assert r.get("ccr:test") == b"1"


# -- the embedded stores are private: loopback, password required, password file 0600 -------

def _without_password(url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1@", url)


def test_postgres_requires_its_password(postgres_server: dict[str, object], servers_dir: Path) -> None:
    admin = str(postgres_server["admin_dsn"])
    assert admin.startswith("postgresql://postgres:") and "@127.0.0.1:" in admin
    with psycopg.connect(admin) as conn:  # the control: with the password it works
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(_without_password(admin), connect_timeout=5).close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(admin.replace("postgres:", "postgres:wrong", 1), connect_timeout=5).close()
    pw_file = password_file(servers_dir / "pgdata")
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
    assert pw_file.read_text().strip() in admin
    # Stored as a SCRAM verifier, and no TCP rule trusts anyone.
    with psycopg.connect(admin) as conn:
        verifier = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'").fetchone()
        rules = conn.execute("SELECT type, auth_method FROM pg_hba_file_rules").fetchall()
    assert verifier is not None and str(verifier[0]).startswith("SCRAM-SHA-256$")
    assert rules and {r[1] for r in rules} == {"scram-sha-256"} and {r[0] for r in rules} == {"host"}


def test_redis_requires_its_password(redis_url: str, servers_dir: Path) -> None:
    assert redis_url.startswith("redis://:") and "@127.0.0.1:" in redis_url
    assert redis.Redis.from_url(redis_url).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(_without_password(redis_url)).get("ccr:any")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(redis_url.replace("redis://:", "redis://:wrong", 1)).ping()
    pw_file = password_file(servers_dir / "redis")
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
    assert pw_file.read_text().strip() in redis_url
    assert redis.Redis.from_url(redis_url).config_get("protected-mode") == {"protected-mode": "yes"}


def test_passwords_are_reused_across_restarts(tmp_path: Path) -> None:
    first = start_postgres(tmp_path / "pg", tmp_path / "logs")
    first.stop()
    pw = password_file(tmp_path / "pg").read_text()
    second = start_postgres(tmp_path / "pg", tmp_path / "logs")
    try:
        assert password_file(tmp_path / "pg").read_text() == pw
        with psycopg.connect(str(second.info["dsn"])) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    finally:
        second.stop()
    r1 = start_redis(tmp_path / "rd", tmp_path / "logs")
    r1.stop()
    r2 = start_redis(tmp_path / "rd", tmp_path / "logs")
    try:
        assert str(r1.info["url"]).split("@")[0] == str(r2.info["url"]).split("@")[0]
        assert redis.Redis.from_url(str(r2.info["url"])).ping()
    finally:
        r2.stop()


def test_redact_url() -> None:
    assert redact_url("postgresql://postgres:s3cr-t_@127.0.0.1:5/ccr") == "postgresql://postgres:***@127.0.0.1:5/ccr"
    assert redact_url("redis://:pw@127.0.0.1:6/0") == "redis://:***@127.0.0.1:6/0"
    assert redact_url("postgresql://ccr@db/ccr") == "postgresql://ccr@db/ccr"
