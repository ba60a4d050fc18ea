"""Config versions, limit changes and policy bundles in the admin chain, on a running `ccr up`
gateway (real Envoy, PostgreSQL, Redis, two workers per hot-path service): who changed what, the
refusals too, a change whose admin row cannot be written never goes live, and `ccr audit verify`
passes over it all (audit/admin_changes.py, ccr/limits_cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.rows import dict_row

from ccr.supervisor import Gateway
from extauth.bundle import build_bundle
from extauth.keys import create_key
from tests.harness import REPO, running_gateway
from tests.test_e2e_config_reload import applied, ask, edit_config, pids, status, wait_for, write_config

VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("admin-chain")
    build_bundle(REPO / "policies", tmp / "bundle.tar.gz", "ccr/authz/decision", revision="r1")

    def edit(cfg: dict[str, Any]) -> None:
        cfg["services"]["workers"] = 2  # two extauth workers load each bundle: one row per change
        cfg["policy"]["bundle"] = {"path": str(tmp / "bundle.tar.gz"), "poll_interval_s": 0.5}

    with running_gateway(tmp, edit) as g:
        yield g


def dsn(gw: Gateway) -> str:
    assert gw.runtime is not None
    return gw.runtime.postgres_dsn


def admin_rows(gw: Gateway, action: str | None = None, target: str | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn(gw), autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM admin_log WHERE (%s::text IS NULL OR action = %s)"
                    " AND (%s::text IS NULL OR target = %s) ORDER BY chain_seq", (action, action, target, target))
        return cur.fetchall()


def ccr(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, "-m", "ccr.cli", "-c", str(gw.config_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


def test_the_start_version_and_bundle_are_recorded_once(gw: Gateway) -> None:
    [start] = admin_rows(gw, "config.start")
    assert start["actor"] == "ccr up" and start["target"] == "config:v1"
    assert start["after"]["digest"] == status(gw)["digest"] and start["chain_id"] == "admin"
    # Two extauth workers loaded r1: the first recorded it, the other found it.
    [act] = admin_rows(gw, "policy.activate", "policy:global")
    assert act["actor"] == "extauth" and act["after"]["revision"] == "r1" and act["before"] is None


def test_config_apply_with_actor_file_edit_and_refusals(gw: Gateway, tmp_path: Path) -> None:
    seq = status(gw)["seq"]
    cfg = yaml.safe_load(gw.config_path.read_text())
    cfg["models"].insert(0, {"match": "claude-admin-*", "provider": "anthropic"})
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(cfg))
    out = ccr(gw, "config", "apply", str(new), "--actor", "alice@example.com")
    assert out.returncode == 0, out.stdout + out.stderr
    [row] = admin_rows(gw, "config.apply", f"config:v{seq + 1}")
    assert row["actor"] == "alice@example.com"
    assert row["before"] == {"seq": seq, "digest": row["before"]["digest"]}
    assert row["after"]["digest"] == status(gw)["digest"] and row["after"]["seq"] == seq + 1
    assert row["after"]["changed"] == ["models.claude-admin-*"]
    assert "limits" not in row["after"]  # only a limits change carries its values

    edit_config(gw, lambda c: c["gateway"].update(request_timeout_s=91))  # an editor, not the CLI
    applied(gw, seq + 2)
    [row] = admin_rows(gw, "config.apply", f"config:v{seq + 2}")
    assert row["actor"] == f"file-edit:{gw.config_path}" and row["after"]["changed"] == ["gateway.request_timeout_s"]

    n = status(gw)["refusals"]
    good = gw.config_path.read_text()
    try:
        edit_config(gw, lambda c: c["gateway"].update(concurrency=3))
        wait_for(lambda: status(gw)["refusals"] > n, "the refusal")
    finally:
        write_config(gw, good)
    refused = wait_for(lambda: [r for r in admin_rows(gw, "config.refused")
                                if "gateway.concurrency: changed" in r["after"]["reason"]], "the refusal's row")
    assert refused[-1]["actor"].startswith("file-edit:") and refused[-1]["after"]["serving"]["seq"] == seq + 2

    cfg["gateway"]["listen"]["port"] = 1  # refused by the CLI itself: the file is never touched
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    out = ccr(gw, "config", "apply", str(bad), "--actor", "mallory")
    assert out.returncode == 2
    [row] = [r for r in admin_rows(gw, "config.refused") if r["actor"] == "mallory"]
    assert "gateway.listen: changed" in row["after"]["reason"] and row["after"]["source"] == str(bad)


def test_a_version_whose_admin_row_cannot_be_written_is_not_applied(gw: Gateway) -> None:
    """Fail closed: with admin_log unwritable the edit is refused and nothing moves; the refusal's row
    is written with the next admin write."""
    st = status(gw)
    seq, n = st["seq"], st["refusals"]
    good = gw.config_path.read_text()
    with psycopg.connect(dsn(gw), autocommit=True) as conn:
        conn.execute("ALTER TABLE admin_log RENAME TO admin_log_away")
        try:
            edit_config(gw, lambda c: c["gateway"].update(request_timeout_s=77))
            got = wait_for(lambda: (s := status(gw))["refusals"] > n and s, "the refusal")
        finally:
            conn.execute("ALTER TABLE admin_log_away RENAME TO admin_log")
    assert "not applied: the admin log write failed" in got["last_error"], got["last_error"]
    assert (got["seq"], got["digest"]) == (seq, st["digest"])
    write_config(gw, good)
    edit_config(gw, lambda c: c["gateway"].update(request_timeout_s=78))
    applied(gw, seq + 2)  # seq + 1 was allocated to the refused edit and is never reused
    rows = admin_rows(gw)
    refusal = next(r for r in rows if r["action"] == "config.refused" and "admin log" in r["after"]["reason"])
    applied_row = next(r for r in rows if r["target"] == f"config:v{seq + 2}")
    assert refusal["chain_seq"] < applied_row["chain_seq"]  # the kept refusal first, then the change
    assert not [r for r in rows if r["target"] == f"config:v{seq + 1}"]


def test_ccr_limits_set_takes_effect_live_and_is_recorded(gw: Gateway) -> None:
    rec, key = create_key(dsn(gw), "limits-cli", ["default"], actor="test")
    before = pids(gw)
    seq = status(gw)["seq"]
    assert ask(gw, "claude-haiku-4-5", key).status_code == 200
    out = ccr(gw, "limits", "set", "cli-key-rpm", "--per", "key", "--value", rec.id, "--amount", "3",
              "--actor", "bob")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"applied as v{seq + 1}" in out.stdout
    codes = [ask(gw, "claude-haiku-4-5", key) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429], [r.text for r in codes]
    assert "cli-key-rpm" in codes[3].json()["error"]["message"]
    assert codes[3].json()["type"] == "error" and "retry-after" in codes[3].headers
    assert pids(gw) == before  # no restart
    [row] = admin_rows(gw, "config.apply", f"config:v{seq + 1}")
    assert row["actor"] == "bob" and row["after"]["changed"] == ["limits.rules.cli-key-rpm"]
    assert not [r for r in row["before"]["limits"]["rules"] if r["name"] == "cli-key-rpm"]
    [rule] = [r for r in row["after"]["limits"]["rules"] if r["name"] == "cli-key-rpm"]
    assert (rule["per"], rule["value"], rule["amount"], rule["unit"]) == ("key", rec.id, 3, "minute")

    listed = ccr(gw, "limits", "list")
    assert listed.returncode == 0 and "cli-key-rpm" in listed.stdout and "3 requests/minute" in listed.stdout
    assert f"config v{seq + 1}" in listed.stdout

    out = ccr(gw, "limits", "set", "cli-key-rpm", "--amount", "0")  # invalid: nothing written
    assert out.returncode == 2 and "amount" in out.stderr, out.stderr
    assert status(gw)["seq"] == seq + 1

    out = ccr(gw, "limits", "set", "cli-key-rpm", "--amount", "10", "--actor", "bob")
    assert out.returncode == 0, out.stdout + out.stderr
    [row] = admin_rows(gw, "config.apply", f"config:v{seq + 2}")
    assert row["after"]["changed"] == ["limits.rules.cli-key-rpm.amount"]
    assert ask(gw, "claude-haiku-4-5", key).status_code == 200  # 4 of 10 now (the refused one is not counted)

    out = ccr(gw, "limits", "remove", "cli-key-rpm", "--actor", "bob")
    assert out.returncode == 0, out.stdout + out.stderr
    [row] = admin_rows(gw, "config.apply", f"config:v{seq + 3}")
    assert row["after"]["limits"]["rules"] == [] and row["before"]["limits"]["rules"][0]["amount"] == 10
    assert "cli-key-rpm" not in yaml.safe_load(gw.config_path.read_text())["limits"].get("rules", [])


def test_policy_push_and_the_revision_going_live(gw: Gateway, tmp_path: Path) -> None:
    r2 = build_bundle(REPO / "policies", tmp_path / "r2.tar.gz", "ccr/authz/decision", revision="r2")
    out = ccr(gw, "policy", "push", str(r2), "--actor", "carol")
    assert out.returncode == 0, out.stdout + out.stderr
    [push] = admin_rows(gw, "policy.push")
    assert push["actor"] == "carol" and push["after"]["revision"] == "r2" and push["target"] == "policy:global"
    acts = wait_for(lambda: (a := admin_rows(gw, "policy.activate")) and len(a) >= 2 and a, "r2 recorded live")
    r1, live = acts[0], acts[-1]
    assert len(acts) == 2  # two workers made it live, one row
    assert live["before"] == {"revision": "r1", "digest": r1["after"]["digest"]}
    assert live["after"]["revision"] == "r2" and live["after"]["digest"] == push["after"]["digest"]
    assert push["chain_seq"] < live["chain_seq"]
    wait_for(lambda: "revision   : r2" in ccr(gw, "policy", "status").stdout, "extauth serving r2")


def test_the_admin_chain_verifies(gw: Gateway) -> None:
    rows = admin_rows(gw)
    assert [r["chain_seq"] for r in rows] == list(range(1, len(rows) + 1))
    for prev, row in zip(rows, rows[1:], strict=False):
        assert bytes(row["prev_hash"]) == bytes(prev["row_hash"])
    assert {"config.start", "config.apply", "config.refused", "policy.push", "policy.activate"} <= {
        r["action"] for r in rows}
    out = ccr(gw, "audit", "verify")
    assert out.returncode == 0, out.stdout + out.stderr
