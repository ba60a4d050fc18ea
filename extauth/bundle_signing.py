"""Verify OPA bundle signatures (`opa build --signing-key`), refusing anything not proven.

`/.signatures.json` is `{"signatures": ["<compact JWS>"]}`. The JWS header names the algorithm
and (optionally) the key id; its payload lists every file of the bundle with its hash:
`{"files": [{"name": "data.json", "hash": "<hex>", "algorithm": "SHA-256"}, ...], "keyid"?, "scope"?}`.
OPA hashes a JSON file (`*.json`, `.manifest`) in a canonical form (keys sorted, no spaces,
numbers as written, strings as Go writes them without HTML escaping) and any other file as raw bytes.

A bundle is accepted only when: exactly one signature, made with the configured algorithm and key
(id), its scope (when configured) matches, and the signed file list equals the bundle's files
exactly (nothing changed, added or removed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import orjson
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OctKey, RSAKey

from extauth.bundle import SIGNATURES, BundleError

_HASHES = {"SHA-256": hashlib.sha256, "SHA-384": hashlib.sha384, "SHA-512": hashlib.sha512}
# Go escapes these two even with HTML escaping off (OPA writes <, > and & as they are).
_GO_ESCAPES = {"\u2028": "\\u2028", "\u2029": "\\u2029"}


class _Number(str):
    """A JSON number kept as written: OPA hashes json.Number text, not a re-formatted float."""


def _go_string(s: str) -> str:
    out = json.dumps(s, ensure_ascii=False)
    for ch, esc in _GO_ESCAPES.items():
        if ch in out:
            out = out.replace(ch, esc)
    return out


def _canonical(v, out: list[str]) -> None:
    if isinstance(v, dict):
        out.append("{")
        for i, k in enumerate(sorted(v)):
            if i:
                out.append(",")
            out.append(_go_string(k))
            out.append(":")
            _canonical(v[k], out)
        out.append("}")
    elif isinstance(v, list):
        out.append("[")
        for i, x in enumerate(v):
            if i:
                out.append(",")
            _canonical(x, out)
        out.append("]")
    elif isinstance(v, _Number):
        out.append(str(v))
    elif isinstance(v, str):
        out.append(_go_string(v))
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif v is None:
        out.append("null")
    else:  # pragma: no cover - json.loads yields nothing else
        raise BundleError(f"unexpected JSON value {v!r}")


def _is_json(name: str) -> bool:
    return name.endswith(".json") or name.rsplit("/", 1)[-1] == ".manifest"


def file_hash(name: str, raw: bytes, algorithm: str) -> str:
    h = _HASHES[algorithm]()
    if _is_json(name):
        try:
            value = json.loads(raw, parse_int=_Number, parse_float=_Number,
                               parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError as e:
            raise BundleError(f"{name} is not valid JSON: {e}") from None
        parts: list[str] = []
        _canonical(value, parts)
        h.update("".join(parts).encode())
    else:
        h.update(raw)
    return h.hexdigest()


ASYMMETRIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
SYMMETRIC = {"HS256", "HS384", "HS512"}


class BundleVerifier:
    """Checks `/.signatures.json` of a bundle against one configured key."""

    def __init__(self, key: bytes, alg: str, key_id: str = "default", scope: str | None = None) -> None:
        if alg not in ASYMMETRIC | SYMMETRIC:
            raise BundleError(f"bundle signature algorithm {alg!r} is not supported")
        self.alg, self.key_id, self.scope = alg, key_id, scope
        try:
            if alg in SYMMETRIC:
                self._key = OctKey.import_key(key)
            elif alg.startswith("ES"):
                self._key = ECKey.import_key(key)
            else:
                self._key = RSAKey.import_key(key)
        except (JoseError, ValueError, TypeError) as e:
            raise BundleError(f"bundle verification key for {alg} cannot be loaded: {e}") from None
        if alg in ASYMMETRIC and self._key.is_private:
            raise BundleError("the bundle verification key is a private key; configure the public key only")

    @classmethod
    def from_file(cls, key_file: str | Path, alg: str, key_id: str = "default",
                  scope: str | None = None) -> BundleVerifier:
        try:
            key = Path(key_file).read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read bundle verification key {key_file}: {e.strerror}") from None
        return cls(key, alg, key_id, scope)

    def verify(self, files: dict[str, bytes], where: str) -> None:
        raw = files.get(SIGNATURES)
        if raw is None:
            raise BundleError(f"{where} is not signed (no /{SIGNATURES}) and a verification key is configured")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BundleError(f"{where}: {SIGNATURES} is not JSON: {e}") from None
        tokens = doc.get("signatures") if isinstance(doc, dict) else None
        if not isinstance(tokens, list) or len(tokens) != 1 or not isinstance(tokens[0], str):
            raise BundleError(f"{where}: {SIGNATURES} must hold exactly one signature")
        try:
            obj = jws.deserialize_compact(tokens[0], self._key, algorithms=[self.alg])
        except JoseError as e:
            raise BundleError(f"{where}: bundle signature does not verify with the configured key: {e}") from None
        except ValueError as e:
            raise BundleError(f"{where}: bundle signature is malformed: {e}") from None
        header = obj.protected
        if header.get("alg") != self.alg:
            raise BundleError(f"{where}: bundle signed with {header.get('alg')}, expected {self.alg}")
        try:
            payload = orjson.loads(obj.payload)
        except orjson.JSONDecodeError:
            raise BundleError(f"{where}: bundle signature payload is not JSON") from None
        if not isinstance(payload, dict):
            raise BundleError(f"{where}: bundle signature payload is not an object")
        kid = header.get("kid") or payload.get("keyid")
        if kid is not None and kid != self.key_id:
            raise BundleError(f"{where}: bundle signed with key id {kid!r}, expected {self.key_id!r}")
        if self.scope is not None and payload.get("scope") != self.scope:
            raise BundleError(f"{where}: bundle signature scope {payload.get('scope')!r} is not {self.scope!r}")
        self._check_files(payload.get("files"), files, where)

    @staticmethod
    def _check_files(signed, files: dict[str, bytes], where: str) -> None:
        if not isinstance(signed, list) or not signed:
            raise BundleError(f"{where}: bundle signature lists no files")
        expected: dict[str, tuple[str, str]] = {}
        for f in signed:
            if not isinstance(f, dict) or not all(isinstance(f.get(k), str) for k in ("name", "hash", "algorithm")):
                raise BundleError(f"{where}: bundle signature has a malformed file entry")
            name = f["name"].lstrip("/")
            if f["algorithm"] not in _HASHES:
                raise BundleError(f"{where}: {name} hashed with unsupported {f['algorithm']!r}")
            if name in expected:
                raise BundleError(f"{where}: bundle signature lists {name} twice")
            expected[name] = (f["hash"].lower(), f["algorithm"])
        present = {n for n in files if n != SIGNATURES}
        if extra := sorted(present - expected.keys()):
            raise BundleError(f"{where}: files not covered by the signature: {extra}")
        if missing := sorted(expected.keys() - present):
            raise BundleError(f"{where}: signed files missing from the bundle: {missing}")
        for name, (digest, algorithm) in expected.items():
            if file_hash(name, files[name], algorithm) != digest:
                raise BundleError(f"{where}: {name} does not match its signed hash (tampered)")


def _signing_key(key: bytes, alg: str):
    if alg not in ASYMMETRIC | SYMMETRIC:
        raise BundleError(f"bundle signature algorithm {alg!r} is not supported")
    try:
        if alg in SYMMETRIC:
            return OctKey.import_key(key)
        k = ECKey.import_key(key) if alg.startswith("ES") else RSAKey.import_key(key)
    except (JoseError, ValueError, TypeError) as e:
        raise BundleError(f"bundle signing key for {alg} cannot be loaded: {e}") from None
    if not k.is_private:
        raise BundleError(f"the bundle signing key for {alg} is a public key; sign with the private key")
    return k


def sign_files(files: dict[str, bytes], key: bytes, alg: str = "RS256", key_id: str | None = None,
               scope: str | None = None) -> bytes:
    """`/.signatures.json` for a bundle's files, as `opa build --signing-key` writes it: one compact JWS
    whose payload lists every file (but the signatures) with its SHA-256 (JSON files canonicalised)."""
    k = _signing_key(key, alg)
    kid = key_id or "default"
    entries = [{"name": name, "hash": file_hash(name, raw, "SHA-256"), "algorithm": "SHA-256"}
               for name, raw in sorted(files.items()) if name != SIGNATURES]
    payload: dict = {"files": entries, "keyid": kid}
    if scope is not None:
        payload["scope"] = scope
    token = jws.serialize_compact({"alg": alg, "kid": kid, "typ": "JWT"}, orjson.dumps(payload), k,
                                  algorithms=[alg])
    return orjson.dumps({"signatures": [token]})


def sign_bundle_file(src: Path, out: Path, key: bytes, alg: str = "RS256", key_id: str | None = None,
                     scope: str | None = None) -> Path:
    """Sign the bundle tarball `src` (an existing signature is replaced) into `out`, atomically."""
    import io
    import os
    import tarfile

    from extauth.bundle import unpack_tarball

    try:
        raw = src.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read bundle {src}: {e.strerror}") from None
    files = unpack_tarball(raw, str(src))
    files.pop(SIGNATURES, None)
    files[SIGNATURES] = sign_files(files, key, alg, key_id, scope)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in sorted(files):
            info = tarfile.TarInfo("/" + name)  # as opa writes its members
            info.size, info.mode = len(files[name]), 0o600
            tar.addfile(info, io.BytesIO(files[name]))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
    return out
