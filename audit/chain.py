"""The audit hash chain: canonical encoding of a row, its link hash, signed checkpoints.

A link's hash is SHA-256 over `LINK_DOMAIN` followed by the canonical JSON (see `canonical`)
of one object:

    {"table": "request_log", "chain": CHAIN_ID, "seq": N, "prev": HEX_OF_PREVIOUS_LINK_HASH,
     "row": {COLUMN: VALUE, ...}}

`row` holds every column the chain covers (audit_chains.columns: all of the table's columns
but the four chain columns themselves, `id` included). `prev` of a chain's first link is 64
zeros. A checkpoint signs (Ed25519) `CHECKPOINT_DOMAIN` + canonical JSON of
{"table", "chain", "seq", "hash", "ts"}: the writer's statement that at `ts` the chain's head
was link `seq` with that hash. docs/audit.md has the whole description.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

LINK_DOMAIN = b"ccr-audit-link-v1\n"
CHECKPOINT_DOMAIN = b"ccr-audit-checkpoint-v1\n"
GENESIS = bytes(32)
ADMIN_CHAIN = "admin"
# The chain columns every chained table carries; never part of a link's own content.
CHAIN_COLUMNS = ("chain_id", "chain_seq", "prev_hash", "row_hash")
# admin_log's content columns, in the order the admin chain covers them.
ADMIN_COLUMNS = ("id", "ts", "actor", "action", "target", "before", "after")
KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
CHECKPOINT_LOG = "checkpoints.jsonl"  # the receivers' copy of every checkpoint they sign


def _utc(v: datetime) -> str:
    u = v.astimezone(UTC)
    return f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}.{u.microsecond:06d}Z"


def _value(v: Any) -> Any:
    """A column value as canonical JSON holds it."""
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError("naive timestamp in an audit row")
        return _utc(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, float) and v != v:  # NaN has no canonical form
        raise ValueError("NaN in an audit row")
    return v


def canonical(obj: Any) -> bytes:
    """UTF-8 JSON, keys sorted, no whitespace, non-ASCII kept as is; timestamps as
    `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, microseconds), bytes as lowercase hex. Floats use
    Python's shortest round-trip form (PostgreSQL's float8 holds the same double)."""
    def norm(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): norm(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [norm(v) for v in x]
        return _value(x)
    return json.dumps(norm(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


_encode_str = json.encoder.encode_basestring  # type: ignore[attr-defined]  # C, keeps non-ASCII as is


def _scalar(v: Any) -> str:
    """One value exactly as `canonical` writes it (the hot path: no intermediate objects)."""
    if v is None:
        return "null"
    if isinstance(v, str):
        return _encode_str(v)  # type: ignore[no-any-return]
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return int.__repr__(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("NaN or infinity in an audit row")
        return float.__repr__(v)
    if isinstance(v, datetime) and v.tzinfo is not None:
        return f'"{_utc(v)}"'
    return canonical(v).decode()  # jsonb objects and lists, bytes; errors for the rest


def _float(v: float) -> str:
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError("NaN or infinity in an audit row")
    return float.__repr__(v)


# The common exact types, dispatched by one lookup (subclasses, datetimes etc. go through _scalar).
_BY_TYPE: dict[type, Any] = {str: _encode_str, int: int.__repr__, float: _float, type(None): lambda _v: "null"}


class _Layout:
    """For one column list: the columns in sorted order (positions and JSON keys), computed once."""

    def __init__(self, columns: tuple[str, ...]) -> None:
        order = sorted(range(len(columns)), key=lambda i: columns[i])
        self.positions = order
        self.keys = [_encode_str(columns[i]) + ":" for i in order]


_LAYOUTS: dict[tuple[str, ...], _Layout] = {}


def _link_hash_values(table: str, chain_id: str, seq: int, prev: bytes, columns: tuple[str, ...],
                      values: tuple[Any, ...]) -> bytes:
    lay = _LAYOUTS.get(columns)
    if lay is None:
        lay = _LAYOUTS[columns] = _Layout(columns)
    fields = ",".join([k + (_BY_TYPE.get(type(v)) or _scalar)(v)
                       for k, v in zip(lay.keys, [values[i] for i in lay.positions], strict=True)])
    body = (f'{{"chain":{_encode_str(chain_id)},"prev":"{prev.hex()}","row":{{{fields}}},'
            f'"seq":{int(seq)},"table":{_encode_str(table)}}}')
    return hashlib.sha256(LINK_DOMAIN + body.encode()).digest()


def link_hash(table: str, chain_id: str, seq: int, prev: bytes, row: dict[str, Any]) -> bytes:
    """SHA-256 of LINK_DOMAIN + canonical({"table", "chain", "seq", "prev", "row"}), built directly."""
    columns = tuple(row)
    return _link_hash_values(table, chain_id, seq, prev, columns, tuple(row.values()))


def link_hash_reference(table: str, chain_id: str, seq: int, prev: bytes, row: dict[str, Any]) -> bytes:
    """link_hash by the documented definition (tests check the two agree)."""
    body = {"table": table, "chain": chain_id, "seq": seq, "prev": prev.hex(), "row": row}
    return hashlib.sha256(LINK_DOMAIN + canonical(body)).digest()


@dataclass
class Head:
    """Where a chain ends: its last link's sequence number and hash (0 / GENESIS when empty)."""

    seq: int = 0
    hash: bytes = GENESIS


def link_rows(table: str, chain_id: str, columns: tuple[str, ...], head: Head,
              rows: list[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], Head]:
    """The rows with (chain_id, seq, prev_hash, row_hash) appended, and the new head.

    `rows` hold the values of `columns` in that order.
    """
    out = []
    seq, prev = head.seq, head.hash
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row has {len(row)} values for {len(columns)} columns")
        seq += 1
        h = _link_hash_values(table, chain_id, seq, prev, columns, row)
        out.append((*row, chain_id, seq, prev, h))
        prev = h
    return out, Head(seq, prev)


def checkpoint_message(table: str, chain_id: str, seq: int, row_hash: bytes, ts: datetime) -> bytes:
    return CHECKPOINT_DOMAIN + canonical({"table": table, "chain": chain_id, "seq": seq,
                                          "hash": row_hash.hex(), "ts": ts})


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Create `path` with `data` atomically (complete or absent); False if it already exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another worker made it first
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def signing_key(audit_dir: Path) -> Ed25519PrivateKey:
    """The checkpoint signing key in `audit_dir` (0600), created on first use with its public half.

    Only the access-log receiver reads it; `ccr audit verify` needs only signing.pub.
    """
    audit_dir.mkdir(parents=True, exist_ok=True)
    audit_dir.chmod(0o700)
    path = audit_dir / KEY_FILE
    if not path.exists():
        new = Ed25519PrivateKey.generate()
        pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        _write_new(path, pem, 0o600)
    path.chmod(0o600)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_path = audit_dir / PUBLIC_KEY_FILE
    if not pub_path.exists() or pub_path.read_bytes() != pub:
        pub_path.unlink(missing_ok=True)
        _write_new(pub_path, pub, 0o644)
    return key
