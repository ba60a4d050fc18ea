"""Starting our own processes in tests the way `ccr up` does: tracked children with ready files."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml

from ccr.contract import ID_ADAPTER, ID_ENVOY
from ccr.pki import issue_run_pki
from ccr.procs import Child, spawn, wait_ready_file
from ccr.runtime import Runtime
from ccr.supervisor import Gateway

REPO = Path(__file__).resolve().parent.parent
# pytest --authz-transport: every gateway_config() asks for this ext_authz transport (tests/conftest.py).
AUTHZ_TRANSPORT: str | None = None


def copy_policy_modules(dest: Path) -> list[str]:
    """The shipped policy's Rego modules (authz.rego and the modules it imports; not the tests)
    copied into `dest`, for tests that pair them with their own data.json. Their names."""
    names = []
    for f in sorted((REPO / "policies").glob("*.rego")):
        if not f.name.endswith("_test.rego"):
            (dest / f.name).write_text(f.read_text())
            names.append(f.name)
    return names


@contextmanager
def running_service(module: str, run_dir: Path, config_yaml: str, *, env: dict[str, str] | None = None,
                    **runtime: Any) -> Iterator[Child]:
    """`python -m <module>` with a runtime file; yields once it has written its ready file.

    The runtime carries a run PKI (as `ccr up` issues it; pass `mtls=` to replace it) with
    identities for Envoy, the adapter and extauth; `Runtime.load(run_dir / "runtime.json")`
    gives a test their paths. Stops the service with SIGTERM afterwards and checks that it
    shut down cleanly.
    """
    if module == "extauth" and "redis_url" not in runtime:
        # No store given: the test is of extauth's identity and policy decisions alone, so the request-time
        # limits stay with the rate limit service (limits.admission: ratelimit) unless the config says otherwise.
        doc = yaml.safe_load(config_yaml) or {}
        limits = doc.get("limits") or {}
        if "admission" not in limits:
            doc["limits"] = {**limits, "admission": "ratelimit"}
            config_yaml = yaml.safe_dump(doc)
    (run_dir / "gateway.yaml").write_text(config_yaml)
    fields: dict[str, Any] = {"postgres_dsn": "postgresql://unused@127.0.0.1:1/unused",
                              "redis_url": "redis://127.0.0.1:1/0", **runtime}
    if "mtls" not in fields:
        fields["mtls"] = issue_run_pki(run_dir / "pki", [ID_ENVOY, ID_ADAPTER, "extauth"])
    Runtime(config_path=str(run_dir / "gateway.yaml"), run_dir=str(run_dir), **fields).save(run_dir / "runtime.json")
    name = module.replace(".", "-")
    ready = run_dir / f"{name}.ready"
    child = spawn(name, [sys.executable, "-m", module, "--runtime", str(run_dir / "runtime.json"),
                         "--ready-file", str(ready)], run_dir / "logs", env=env, cwd=REPO)
    try:
        wait_ready_file(child, ready)
        yield child
    finally:
        code = child.stop()
    assert code == 0, f"{module} did not shut down cleanly on SIGTERM (exit {code}):\n{child.log_tail()}"


def create_database(admin_dsn: str, prefix: str = "t") -> str:
    """A new empty database on the server of `admin_dsn`; returns its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_dsn.rsplit("/", 1)[0] + f"/{name}"


def gateway_config(tmp: Path, edit: Callable[[dict[str, Any]], object] | None = None) -> Path:
    """The example config with its data under `tmp` and the repo's policies, then `edit`ed in place."""
    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    cfg["storage"]["data_dir"] = str(tmp / "data")
    cfg["policy"]["dir"] = str(REPO / "policies")
    if AUTHZ_TRANSPORT is not None:
        cfg["services"]["authz_transport"] = AUTHZ_TRANSPORT
    if edit is not None:
        edit(cfg)
    path = tmp / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def log_rows(dsn: str, column: str, value: str, n: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
    """At least n request_log rows with column = value; Envoy flushes the gRPC access log in batches."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        while True:
            cur.execute(f"SELECT * FROM request_log WHERE {column} = %s ORDER BY id", (value,))  # noqa: S608
            got = cur.fetchall()
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} request_log rows with {column}={value!r} after {timeout}s")
            time.sleep(0.05)


def log_row(dsn: str, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The access-log row for a request."""
    return log_rows(dsn, "request_id", request_id, timeout=timeout)[0]


def emulator_records(gw: Gateway) -> list[dict[str, Any]]:
    """What the emulator (the upstream provider) still keeps of what it received, oldest first: only its
    last --record-limit requests, so to see what an action sent (or that it sent nothing), use `emulator_mark`."""
    return httpx.get(f"{gw.emulator_url}/_emulator/requests").json()  # type: ignore[no-any-return]


class RecordsLost(AssertionError):
    """A mark-based read could not be answered in full (records dropped, or another emulator process)."""


@dataclass(frozen=True)
class RecordMark:
    """A place in an Anthropic emulator's request records (emulators/anthropic.py, each numbered by a
    sequence that only grows): `arrived()` is exactly what the emulator received after it.

    The emulator keeps only its last --record-limit records, so counting them before an action and
    slicing after goes blind once that ring is full (and "nothing reached the provider" then passes on
    nothing). A mark does not: it reads by sequence number, and a read whose records were already
    dropped, or cleared, or that reaches a different (restarted) emulator raises `RecordsLost`."""

    url: str
    instance: str
    seq: int

    def arrived(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/_emulator/requests", params={"after": self.seq, "instance": self.instance})
        if r.status_code in (409, 410):
            raise RecordsLost(f"records after mark {self.seq} at {self.url}: {r.status_code} {r.text}")
        r.raise_for_status()
        return r.json()["records"]  # type: ignore[no-any-return]


def emulator_mark(target: Gateway | str) -> RecordMark:
    """A mark in the records of the gateway's built-in emulator, or of the Anthropic emulator at a URL."""
    url = target if isinstance(target, str) else target.emulator_url
    assert url, "this gateway runs no emulator"
    r = httpx.get(f"{url}/_emulator/requests/mark")
    r.raise_for_status()
    pos = r.json()
    return RecordMark(url, pos["instance"], pos["last_seq"])


@contextmanager
def running_gateway(tmp: Path, edit: Callable[[dict[str, Any]], object] | None = None, *,
                    local_key: bool = True) -> Iterator[Gateway]:
    """A whole gateway on `gateway_config(tmp, edit)`, with a local API key unless `local_key` is False;
    stopped afterwards, with a check that every child is gone."""
    g = Gateway(gateway_config(tmp, edit)).start()
    if local_key:
        g.issue_local_key()
    try:
        yield g
    finally:
        g.stop()
    assert all(not c.alive() for c in g.children)
