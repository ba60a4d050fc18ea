"""The PostgreSQL role the access-log receiver connects as: read and append audit rows, nothing else.

Migration 9 creates `ccr_audit_writer` (NOLOGIN) with SELECT/INSERT on the audit tables and no
UPDATE, DELETE or TRUNCATE. When ccr manages PostgreSQL, `ccr up` gives it a login and a generated
password (kept next to the data dir, 0600, reused across restarts) and hands the receiver a DSN
for it; migrations and the CLI keep the superuser DSN.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

AUDIT_ROLE = "ccr_audit_writer"


def _password(path: Path) -> str:
    if path.exists():
        path.chmod(0o600)
        pw = path.read_text().strip()
        if pw:
            return pw
    pw = secrets.token_urlsafe(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pw + "\n")
    return pw


def audit_role_dsn(admin_dsn: str, password_file: Path) -> str:
    """Let the audit role log in with the password in `password_file`; its DSN for the same database."""
    password = _password(password_file)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(AUDIT_ROLE),
                                                                      sql.Literal(password)))
    return make_conninfo(admin_dsn, user=AUDIT_ROLE, password=password)
