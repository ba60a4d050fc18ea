import psycopg
import redis


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
