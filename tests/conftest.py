"""Shared fixtures: one real PostgreSQL and one real Redis per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ccr import db
from ccr.fixtures import AGENT_REQUEST, fixture_path
from ccr.localservers import start_postgres, start_redis
from ccr.supervisor import Gateway
from tests import harness
from tests.harness import create_database, running_gateway
from tests.idp import TestIdP, running_idp

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--authz-transport", choices=("grpc", "http"), default=None,
                     help="run every gateway the tests start with this services.authz_transport "
                          "(default: the config's own), e.g. to run the e2e suite against the HTTP front")


def pytest_configure(config: pytest.Config) -> None:
    harness.AUTHZ_TRANSPORT = config.getoption("--authz-transport")


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def postgres_server(servers_dir: Path) -> Iterator[dict[str, object]]:
    child = start_postgres(servers_dir / "pgdata", servers_dir / "logs")
    try:
        yield child.info
    finally:
        child.stop()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: dict[str, object]) -> str:
    """A fresh database on the session's server with the ccr schema applied."""
    dsn = create_database(str(postgres_server["admin_dsn"]))
    db.migrate(dsn)
    return dsn


@pytest.fixture
def own_dsn(postgres_server: dict[str, object]) -> str:
    """A database of the test alone with the ccr schema (the session's `postgres_dsn` is shared, so what
    other tests wrote there depends on their order, which differs when tests run in parallel)."""
    dsn = create_database(str(postgres_server["admin_dsn"]), prefix="own")
    db.migrate(dsn)
    return dsn


@pytest.fixture(scope="session")
def redis_url(servers_dir: Path) -> Iterator[str]:
    child = start_redis(servers_dir / "redis", servers_dir / "logs")
    try:
        yield str(child.info["url"])
    finally:
        child.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of the test alone (the session's `redis_url` is shared): one it may flush, stop or count the
    clients of."""
    child = start_redis(tmp_path / "redis", tmp_path / "logs")
    try:
        yield str(child.info["url"])
    finally:
        child.stop()


@pytest.fixture(scope="session")
def agent_request_bytes() -> bytes:
    return fixture_path(AGENT_REQUEST).read_bytes()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A whole gateway on the example config, one per test module; a module that needs another
    configuration defines its own `gw`."""
    with running_gateway(tmp_path_factory.mktemp("gw")) as g:
        yield g


@pytest.fixture(scope="module")
def dsn(gw: Gateway) -> str:
    """The PostgreSQL database of the module's gateway."""
    assert gw.runtime is not None
    return gw.runtime.postgres_dsn


@pytest.fixture
def idp() -> Iterator[TestIdP]:
    """A fresh test OpenID provider (tests/idp.py) on a free loopback port."""
    with running_idp() as p:
        yield p
