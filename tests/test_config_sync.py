"""Config versions without the gateway: the digest, what may change live, and a follower's apply and
acknowledgement (ccr/config_sync.py). tests/test_e2e_config_reload.py runs them in a real gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ccr.config import GatewayConfig
from ccr.config_sync import (
    Follower,
    Version,
    digest_of,
    load_version,
    parse_text,
    publish_initial,
    read_acks,
    read_targets,
    restart_only_changes,
    worker_id,
    write_snapshot,
    write_targets,
)
from router.config_push import grown
from router.xds import CDS, EDS, LDS, Snapshot
from tests.harness import REPO

EXAMPLE = (REPO / "ccr.example.yaml").read_text()


def _doc() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE)


def _cfg(doc: dict[str, Any]) -> GatewayConfig:
    return GatewayConfig.model_validate(doc)


def test_digest_ignores_layout_and_sees_values() -> None:
    base = parse_text(EXAMPLE, "x")
    assert digest_of(parse_text(yaml.safe_dump(_doc(), sort_keys=True), "y")) == digest_of(base)
    doc = _doc()
    doc["limits"]["requests_per_minute"] = 7
    assert digest_of(_cfg(doc)) != digest_of(base)


def test_live_sections_pass_and_start_only_fields_are_named() -> None:
    old = _cfg(_doc())
    doc = _doc()
    doc["models"].insert(0, {"match": "claude-oss-*", "provider": "oss"})
    doc["providers"].append({"name": "oss", "kind": "openai", "endpoint": "http://127.0.0.1:9"})
    doc["limits"]["requests_per_minute"] = 5
    doc["gateway"]["request_timeout_s"] = 30
    doc["files"] = {"enabled": True}
    assert restart_only_changes(old, _cfg(doc)) == []

    doc = _doc()
    doc["gateway"]["concurrency"] = 2
    doc["services"]["workers"] = 3
    doc["limits"]["envoy_config_dir"] = "rl"
    doc["providers"][0]["api_key_env"] = "OTHER"
    doc["providers"].append({"name": "keyed", "kind": "openai", "endpoint": "http://x", "api_key_env": "K"})
    doc["providers"].append({"name": "bed", "kind": "bedrock", "endpoint": "http://b", "region": "us-east-1",
                             "aws_access_key_id_env": "A", "aws_secret_access_key_env": "B"})
    got = "\n".join(restart_only_changes(old, _cfg(doc)))
    for field in ("gateway.concurrency", "services: changed", "limits.envoy_config_dir",
                  "providers.anthropic.api_key_env", "providers.keyed:", "providers.bed:"):
        assert field in got, got


def test_follower_applies_its_target_and_acknowledges(tmp_path: Path) -> None:
    cfg_file = tmp_path / "ccr.yaml"
    cfg_file.write_text(EXAMPLE)
    v1 = publish_initial(tmp_path, cfg_file, {"extauth": 2})
    assert read_targets(tmp_path) == {"extauth": v1} and load_version(tmp_path, v1).models
    seen: list[int] = []
    f = Follower("extauth", worker_id("extauth", str(tmp_path / "extauth.1.ready")), tmp_path, v1)
    f.applies.append(lambda c: seen.append(c.limits.requests_per_minute))
    f._started()
    assert read_acks(tmp_path)["extauth.1"]["seq"] == 1

    doc = _doc()
    doc["limits"]["requests_per_minute"] = 9
    text = yaml.safe_dump(doc)
    v2 = Version(2, digest_of(parse_text(text, "v2")))
    write_snapshot(tmp_path, 2, text)
    write_targets(tmp_path, {"extauth": v2})
    f.check()
    assert seen == [9] and f.current == v2
    ack = read_acks(tmp_path)["extauth.1"]
    assert (ack["seq"], ack["digest"], ack["error"]) == (2, v2.digest, None)

    # A hook that fails: the version is refused, the old one stays, the refusal is acknowledged.
    def broken(_c: GatewayConfig) -> None:
        raise RuntimeError("cannot build")

    f.applies.insert(0, broken)
    write_snapshot(tmp_path, 3, EXAMPLE)
    write_targets(tmp_path, {"extauth": Version(3, v1.digest)})
    f.check()
    ack = read_acks(tmp_path)["extauth.1"]
    assert f.current == v2 and (ack["seq"], ack["target_seq"]) == (2, 3) and "cannot build" in ack["error"]

    # A snapshot whose digest is not the target's is refused before any hook runs.
    f.applies.remove(broken)
    write_targets(tmp_path, {"extauth": Version(4, "0" * 64)})
    write_snapshot(tmp_path, 4, EXAMPLE)
    f.check()
    assert f.current == v2 and "digest" in read_acks(tmp_path)["extauth.1"]["error"]
    assert seen == [9]


@pytest.mark.parametrize(("ready", "want"), [("extauth.ready", "extauth.0"), ("extauth.3.ready", "extauth.3"),
                                             (None, "extauth.0")])
def test_worker_id(ready: str | None, want: str) -> None:
    assert worker_id("extauth", ready) == want


def test_grown_snapshot_adds_clusters_and_keeps_the_rest() -> None:
    from google.protobuf import any_pb2

    def a(v: bytes) -> any_pb2.Any:
        return any_pb2.Any(type_url="t", value=v)

    old = Snapshot.from_types({LDS: [("l", a(b"old"))], CDS: [("c1", a(b"1")), ("gone", a(b"g"))], EDS: []})
    new = Snapshot.from_types({LDS: [("l", a(b"new"))], CDS: [("c1", a(b"1x")), ("added", a(b"a"))],
                               EDS: [("added", a(b"e"))]})
    g = grown(old, new)
    assert [n for n, _ in g.by_type[CDS]] == ["c1", "gone", "added"]
    assert dict(g.by_type[CDS])["c1"].value == b"1"  # the old version of what both have
    assert g.by_type[LDS] == old.by_type[LDS] and [n for n, _ in g.by_type[EDS]] == ["added"]
    assert g.version not in (old.version, new.version)


def test_a_version_a_service_refuses_is_rolled_back_everywhere(tmp_path: Path, postgres_dsn: str) -> None:
    """The distributor with real followers (in this loop) and an ADS server: the adapter refuses v2, so
    extauth never gets it, Envoy's snapshot goes back to v1's, and the edit is recorded as refused
    (status file, and the admin chain: v2 recorded before it went out, then its rollback)."""
    import asyncio

    import psycopg

    from audit.admin_changes import AdminRecorder
    from ccr import db

    db.migrate(postgres_dsn)

    from router.__main__ import Publisher, snapshot_for
    from router.config_push import Distributor
    from router.pools import Registry
    from router.xds import AdsServer
    from tests.test_routing import _runtime

    cfg_file = tmp_path / "ccr.yaml"
    cfg_file.write_text(EXAMPLE)
    followers = {"adapter": 1, "extauth": 1}
    from ccr.credentials import write_secret

    runtime = _runtime().model_copy(update={
        "run_dir": str(tmp_path), "config_path": str(cfg_file), "config_followers": followers,
        "provider_credentials": {"anthropic": str(write_secret(tmp_path / "a.json", "anthropic", "k"))}})
    v1 = publish_initial(tmp_path, cfg_file, followers)
    config = load_version(tmp_path, v1)

    async def body() -> None:
        base = snapshot_for(config, runtime)
        ads = AdsServer(base)
        pub = Publisher(ads, base, Registry(config))
        dist = Distributor(pub, runtime, config, v1, lambda c: snapshot_for(c, runtime),
                           AdminRecorder(postgres_dsn))
        adapter = Follower("adapter", "adapter.0", tmp_path, v1)
        extauth = Follower("extauth", "extauth.0", tmp_path, v1)
        applied: list[str] = []

        def refuse(c: GatewayConfig) -> None:
            if any(p.name == "oss" for p in c.providers):
                raise RuntimeError("no translator for oss")

        adapter.applies.append(refuse)
        extauth.applies.append(lambda c: applied.append("extauth"))
        for f in (adapter, extauth):
            f.start_async()
        doc = _doc()
        doc["providers"].append({"name": "oss", "kind": "openai", "endpoint": "http://127.0.0.1:9"})
        doc["models"].insert(0, {"match": "claude-oss-*", "provider": "oss"})
        await dist.consider(yaml.safe_dump(doc), "edit")
        st = dist.status
        assert (st["seq"], st["digest"], st["state"]) == (1, v1.digest, "applied")
        assert "adapter.0: RuntimeError: no translator for oss" in st["last_error"]
        assert st["history"][-1]["result"] == "rolled back"
        assert read_targets(tmp_path) == {"adapter": v1, "extauth": v1}
        assert applied == []  # extauth never saw v2
        assert pub.base is base and ads.snapshot.version == base.version  # Envoy: v1's resources again
        # The next good edit gets a new number (2 was spent on the refused one).
        doc = _doc()
        doc["limits"]["requests_per_minute"] = 11
        await dist.consider(yaml.safe_dump(doc), "edit 2")
        assert dist.status["seq"] == 3 and dist.current.seq == 3 and applied == ["extauth"]
        for f in (adapter, extauth):
            f.stop()

    asyncio.run(body())
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute("SELECT action, target, actor, before, after FROM admin_log WHERE chain_id = 'admin'"
                            " AND (actor = 'file-edit:edit' OR actor = 'file-edit:edit 2') ORDER BY chain_seq"
                            ).fetchall()
    assert [(a, t) for a, t, *_ in rows] == [("config.apply", "config:v2"), ("config.refused", "config:v2"),
                                             ("config.apply", "config:v3")]
    assert "no translator for oss" in rows[1][4]["reason"] and rows[1][4]["seq"] == 2
    assert rows[0][4]["changed"] == ["models.claude-oss-*", "providers.oss"]
    assert rows[2][3]["limits"]["requests_per_minute"] == 600 and rows[2][4]["limits"]["requests_per_minute"] == 11


def test_a_router_without_followers_refuses_live_edits(tmp_path: Path) -> None:
    """Standalone parts read their config once: a router no service follows never pushes an edit to
    Envoy alone (Envoy would route by a version extauth, ratelimit and the adapter do not hold)."""
    import asyncio

    from router.__main__ import Publisher, snapshot_for
    from router.config_push import Distributor
    from router.pools import Registry
    from router.xds import AdsServer
    from tests.test_routing import _runtime

    cfg_file = tmp_path / "ccr.yaml"
    cfg_file.write_text(EXAMPLE)
    from ccr.credentials import write_secret

    runtime = _runtime().model_copy(update={
        "run_dir": str(tmp_path), "config_path": str(cfg_file), "config_followers": {},
        "provider_credentials": {"anthropic": str(write_secret(tmp_path / "a.json", "anthropic", "k"))}})
    v1 = publish_initial(tmp_path, cfg_file, {})
    config = load_version(tmp_path, v1)

    async def body() -> None:
        base = snapshot_for(config, runtime)
        ads = AdsServer(base)
        pub = Publisher(ads, base, Registry(config))
        dist = Distributor(pub, runtime, config, v1, lambda c: snapshot_for(c, runtime), None)
        doc = _doc()
        doc["limits"]["requests_per_minute"] = 11
        await dist.consider(yaml.safe_dump(doc), "edit")
        st = dist.status
        assert (st["seq"], st["digest"], st["state"]) == (1, v1.digest, "applied")
        assert "standalone parts (ccr serve) read their config at start" in st["last_error"]
        assert pub.base is base and ads.snapshot.version == base.version  # Envoy never saw it
        assert dist.current == v1 and dist.config.limits.requests_per_minute == config.limits.requests_per_minute

    asyncio.run(body())
