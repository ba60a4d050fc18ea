"""The sign-in key material, kept in one directory (mode 0700; secret files 0600).

- `session-signing.jwk`: the Ed25519 private key that signs session tokens. Only the
  sign-in service reads it.
- `session-signing.pub.jwks`: its public half as a JWKS. extauth verifies with it; it
  is not a secret, so extauth never holds anything that can mint a token.
- `sealing.key`: a 32-byte AES-256-GCM key that seals what the gateway hands out or
  stores but must not be read or altered: IdP refresh tokens in the sessions table,
  the browser flow's state cookie and the device flow's handle. Sign-in service only.

The files are created once (O_EXCL, so concurrent starters agree on one key) and
refused when group or others can read a secret one. `rotate_signing_key` makes a new
signing key: its public half is published first, beside the previous one (tokens it
signed stay valid until they expire), then the private key is swapped; the sign-in
service and extauth pick both files up without a restart.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc.jwk import KeySet, OKPKey

log = logging.getLogger(__name__)
T = TypeVar("T")

SIGNING_KEY = "session-signing.jwk"
PUBLIC_KEYS = "session-signing.pub.jwks"
SEALING_KEY = "sealing.key"
# Fully specified EdDSA with Ed25519 (RFC 9864); the only algorithm session tokens use.
ALG = "Ed25519"


class KeyFileError(Exception):
    """A key file that is missing, malformed or readable by others."""


def _temp_beside(path: Path, data: bytes, mode: int) -> Path:
    """A new file next to `path` holding `data` on disk, with `mode` from the start."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Create `path` with `data` unless it exists; True when this call created it."""
    tmp = _temp_beside(path, data, mode)
    try:
        os.link(tmp, path)  # fails if another starter won the race: keep theirs
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _new_signing_key() -> OKPKey:
    return OKPKey.generate_key("Ed25519", parameters={"kid": secrets.token_urlsafe(9), "alg": ALG, "use": "sig"})


def _replace(path: Path, data: bytes, mode: int) -> None:
    _temp_beside(path, data, mode).replace(path)


def rotate_signing_key(key_dir: str | Path) -> tuple[str, str]:
    """A new signing key; returns (old kid, new kid). The JWKS keeps the new and the
    previous public key only: rotate no more often than the session token lifetime, or
    tokens signed two keys ago stop verifying early (they then refresh or sign in again)."""
    d = Path(key_dir)
    old = load_signing_key(d)
    new = _new_signing_key()
    _replace(d / PUBLIC_KEYS, json.dumps({"keys": [new.as_dict(private=False), old.as_dict(private=False)]})
             .encode(), 0o644)
    _replace(d / SIGNING_KEY, json.dumps(new.as_dict(private=True)).encode(), 0o600)
    return str(old.kid), str(new.kid)


def ensure_keys(key_dir: str | Path) -> Path:
    """Create the key directory and any missing key; returns the directory."""
    d = Path(key_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    if not (d / SIGNING_KEY).exists():
        key = _new_signing_key()
        _write_new(d / SIGNING_KEY, json.dumps(key.as_dict(private=True)).encode(), 0o600)
    if not (d / PUBLIC_KEYS).exists():
        key = load_signing_key(d)
        jwks = {"keys": [key.as_dict(private=False)]}
        _write_new(d / PUBLIC_KEYS, json.dumps(jwks).encode(), 0o644)
    if not (d / SEALING_KEY).exists():
        _write_new(d / SEALING_KEY, base64.urlsafe_b64encode(AESGCM.generate_key(256)), 0o600)
    return d


def _read_secret(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: missing (the sign-in service creates it on first start)") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyFileError(f"{path}: readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                           f"run `chmod 600 {path}`")
    return path.read_bytes()


def load_signing_key(key_dir: str | Path) -> OKPKey:
    path = Path(key_dir) / SIGNING_KEY
    try:
        key = OKPKey.import_key(json.loads(_read_secret(path)))
    except (ValueError, KeyError) as e:
        raise KeyFileError(f"{path}: not an Ed25519 private JWK ({e})") from None
    if key.curve_name != "Ed25519" or not key.is_private or not key.kid:
        raise KeyFileError(f"{path}: not an Ed25519 private JWK with a kid")
    return key


def load_public_keys(key_dir: str | Path) -> KeySet:
    path = Path(key_dir) / PUBLIC_KEYS
    try:
        ks = KeySet.import_key_set(json.loads(path.read_text()))
    except FileNotFoundError:
        raise KeyFileError(f"{path}: missing (the sign-in service creates it on first start)") from None
    except (ValueError, KeyError) as e:
        raise KeyFileError(f"{path}: not a JWKS ({e})") from None
    for k in ks.keys:
        if k.is_private:
            raise KeyFileError(f"{path}: holds a private key; it must hold public keys only")
    return ks


class Sealer:
    """AES-256-GCM with a random 96-bit nonce; `purpose` is bound in as associated data so
    a sealed value made for one use (a cookie) is refused in another (a device handle)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def load(cls, key_dir: str | Path) -> Sealer:
        path = Path(key_dir) / SEALING_KEY
        try:
            key = base64.urlsafe_b64decode(_read_secret(path).strip())
        except ValueError:
            key = b""
        if len(key) != 32:
            raise KeyFileError(f"{path}: not a base64url 32-byte key")
        return cls(key)

    def seal(self, plaintext: bytes, purpose: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, plaintext, purpose.encode())

    def open(self, sealed: bytes, purpose: str) -> bytes | None:
        """The plaintext, or None when the value was not sealed by us for this purpose."""
        if len(sealed) < 12 + 16:
            return None
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], purpose.encode())
        except InvalidTag:
            return None

    def seal_json(self, doc: dict, purpose: str) -> str:
        raw = self.seal(json.dumps(doc, separators=(",", ":")).encode(), purpose)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def open_json(self, text: str, purpose: str) -> dict | None:
        if not text or len(text) > 8192:
            return None
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            return None
        plain = self.open(raw, purpose)
        if plain is None:
            return None
        doc = json.loads(plain)
        return doc if isinstance(doc, dict) else None


class KeyFile(Generic[T]):
    """A key file re-read when it changes on disk (checked at most every `min_interval_s`)."""

    def __init__(self, path: Path, load: Callable[[Path], T], min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._load = load
        self._min = min_interval_s
        self._clock = clock
        self._stamp = self._stat()
        self.value: T = load(path.parent)
        self._checked = clock()

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def refresh(self) -> bool:
        """Reload if the file changed; True when it did. A broken new file keeps the old value."""
        now = self._clock()
        if now - self._checked < self._min:
            return False
        self._checked = now
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            value = self._load(self.path.parent)
        except (OSError, KeyFileError) as e:
            log.error("%s: not reloaded, keeping the current keys: %s", self.path, e)
            return False
        self._stamp, self.value = stamp, value
        log.info("%s reloaded", self.path)
        return True
