"""audit/admin_changes.py on its own: the diff summary names paths, never values; a refusal that
cannot be written is kept and written, in order, with the next admin write; a change made live by
several workers is recorded once."""

from __future__ import annotations

import psycopg

from audit.admin_changes import AdminRecorder, NotRecorded, changed_paths, config_change
from audit.verify import verify


def test_changed_paths_name_paths_not_values() -> None:
    old = {"storage": {"postgres_dsn": "postgresql://u:secret@h/db"},
           "limits": {"requests_per_minute": 600, "rules": [{"name": "a", "amount": 1}, {"name": "b", "amount": 2}]},
           "models": [{"match": "x-*", "provider": "p"}, {"match": "y-*", "provider": "p"}]}
    new = {"storage": {"postgres_dsn": "postgresql://u:other-secret@h/db"},
           "limits": {"requests_per_minute": 600, "rules": [{"name": "b", "amount": 3}, {"name": "c", "amount": 1}]},
           "models": [{"match": "y-*", "provider": "p"}, {"match": "x-*", "provider": "p"}]}
    paths = changed_paths(old, new)
    assert paths == ["limits.rules.a", "limits.rules.b.amount", "limits.rules.c", "models (order)",
                     "storage.postgres_dsn"]
    assert "secret" not in repr(paths)
    assert changed_paths(old, old) == []
    # Limits (which hold no secrets) travel whole; any other section by path only.
    _, before, after = config_change(old, new)
    assert before == old["limits"] and after == new["limits"]
    assert config_change(old, {**old, "storage": new["storage"]})[1:] == (None, None)


def test_a_refusal_is_kept_until_the_next_write(own_dsn: str) -> None:
    postgres_dsn = own_dsn
    broken = AdminRecorder("postgresql://nobody@127.0.0.1:1/none")
    assert broken.record_or_keep("t", "config.refused", "config", None, {"reason": "r1"}) is False
    try:
        broken.record("t", "config.apply", "config:v9", None, {"seq": 9})
        raise AssertionError("a failed write must raise")
    except NotRecorded as e:
        assert "admin log write failed" in str(e)
    assert len(broken.pending) == 1
    broken.dsn = postgres_dsn
    broken.record("t", "config.apply", "config:v10", None, {"seq": 10})
    assert broken.pending == []
    with psycopg.connect(postgres_dsn) as conn:
        got = conn.execute("SELECT action, target FROM admin_log WHERE actor = 't' ORDER BY chain_seq").fetchall()
    assert got == [("config.refused", "config"), ("config.apply", "config:v10")]


def test_record_once_writes_one_row_for_several_workers(own_dsn: str) -> None:
    postgres_dsn = own_dsn
    a, b = AdminRecorder(postgres_dsn), AdminRecorder(postgres_dsn)
    after = {"set": "s1", "revision": "r1", "digest": "d1"}
    assert a.record_once("extauth", "policy.activate", "policy:once", None, after, "digest") is True
    assert b.record_once("extauth", "policy.activate", "policy:once", None, after, "digest") is False
    assert b.record_once("extauth", "policy.activate", "policy:once", None, {**after, "digest": "d2"},
                         "digest") is True
    with psycopg.connect(postgres_dsn) as conn:
        n = conn.execute("SELECT count(*) FROM admin_log WHERE target = 'policy:once'").fetchone()
    assert n == (2,)
    # The database is this test's alone: its whole chain verifies (it has no checkpoints, so no keys).
    assert verify(postgres_dsn, [], None, None).problems == []


def test_limits_edit_keeps_the_rest_of_the_file() -> None:
    from ccr.limits_cli import edit_limits

    text = ("# the team's gateway\ngateway:\n  request_timeout_s: 30  # long answers\nlimits:\n"
            "  requests_per_minute: 600\n  rules:\n    - {name: eng, per: group, value: eng, amount: 300}\n")

    def change(limits) -> str:
        limits["rules"][0]["amount"] = 5
        limits["rules"].append({"name": "new", "per": "key", "amount": 3})
        return "changed"

    out, what = edit_limits(text, change)
    assert what == "changed"
    assert out.startswith("# the team's gateway\n") and "request_timeout_s: 30  # long answers" in out
    import yaml

    assert yaml.safe_load(out)["limits"]["rules"] == [
        {"name": "eng", "per": "group", "value": "eng", "amount": 5}, {"name": "new", "per": "key", "amount": 3}]
