"""Build and read OPA WASM policy bundles (`opa build -t wasm`), the standard OPA bundle format.

A bundle is a gzipped tar (or a directory with the same layout) of `policy.wasm`, `data.json`
files (at any depth: `/a/b/data.json` is `data.a.b`), an optional `/.manifest` (revision, roots,
wasm entrypoints) and an optional `/.signatures.json` (see extauth/bundle_signing.py).
Reading is defensive: only regular files, no `..`, no duplicates, bounded unpacked size.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from extauth.bundle_signing import BundleVerifier

MANIFEST = ".manifest"
SIGNATURES = ".signatures.json"
DEFAULT_MAX_UNPACKED = 256 * 1024 * 1024  # a gzip bomb stops here


class BundleError(Exception):
    """The bundle cannot be built or read; the message says why and what to do."""


def find_opa() -> str:
    """The opa CLI: on PATH, else next to the running interpreter (.venv/bin/opa)."""
    found = shutil.which("opa")
    if found:
        return found
    beside = Path(sys.executable).parent / "opa"
    if beside.is_file():
        return str(beside)
    raise BundleError(
        "the `opa` CLI was not found on PATH or next to the Python interpreter "
        f"({beside}); install it (e.g. `go install github.com/open-policy-agent/opa@v1.22.3`) "
        "and put it on PATH"
    )


def build_bundle(
    policy_dir: str | Path, out_path: str | Path, entrypoint: str, *,
    revision: str | None = None, signing_key: str | Path | None = None, signing_alg: str = "RS256",
    key_id: str | None = None, scope: str | None = None,
) -> Path:
    """Compile the Rego in `policy_dir` (plus its data.json) to a WASM bundle at `out_path`.

    `*_test.rego` files are left out of the bundle; run `opa test` for them. With a signing key
    the bundle is built in OPA's bundle mode and gets a `/.signatures.json`.
    """
    src = Path(policy_dir)
    if not src.is_dir():
        raise BundleError(f"policy directory {src} does not exist")
    out = Path(out_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cmd = [find_opa(), "build", "-t", "wasm", "-e", entrypoint, "--ignore", "*_test.rego", "-o", str(tmp)]
    if revision is not None:
        cmd += ["--revision", revision]
    if signing_key is not None:
        # Signing needs bundle mode; `--bundle` also keeps data.json at the bundle's root.
        cmd += ["--bundle", "--signing-key", str(Path(signing_key).resolve()), "--signing-alg", signing_alg]
        if key_id is not None:
            cmd += ["--claims-file", str(_claims_file(tmp, key_id, scope))]
        elif scope is not None:
            cmd += ["--claims-file", str(_claims_file(tmp, None, scope))]
    # The bundle names the Rego files by the path given: build from inside the directory so the
    # bundle says /authz.rego, not this machine's absolute path.
    cmd.append(".")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=src)
    tmp.with_name(tmp.name + ".claims.json").unlink(missing_ok=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        detail = (proc.stderr or proc.stdout).strip()
        raise BundleError(f"opa build of {src} (entrypoint {entrypoint}) failed:\n{detail}")
    tmp.replace(out)  # atomic: a reader never sees half a bundle
    return out


def _claims_file(tmp: Path, key_id: str | None, scope: str | None) -> Path:
    claims: dict = {}
    if key_id is not None:
        claims["keyid"] = key_id
    if scope is not None:
        claims["scope"] = scope
    p = tmp.with_name(tmp.name + ".claims.json")
    p.write_bytes(orjson.dumps(claims))
    return p


@dataclass(frozen=True)
class Bundle:
    wasm: bytes
    data: dict
    digest: str  # sha256 of the bundle file (or of a directory's files); keys the decision cache
    path: str  # where it came from (file, directory or URL)
    revision: str = ""
    roots: tuple[str, ...] = ("",)
    signed: bool = False
    files: tuple[str, ...] = field(default=(), repr=False)


def _clean_name(name: str) -> str:
    """A member name as the bundle means it ('/a/b.json' -> 'a/b.json'); refuse escapes."""
    n = name.replace("\\", "/").lstrip("/")
    while n.startswith("./"):
        n = n[2:]
    parts = PurePosixPath(n).parts
    if not n or any(p in ("..", "") for p in parts):
        raise BundleError(f"bundle member {name!r} has an unsafe path")
    return "/".join(parts)


def unpack_tarball(raw: bytes, where: str, max_unpacked: int = DEFAULT_MAX_UNPACKED) -> dict[str, bytes]:
    """The files of a gzipped tar bundle by their clean names; links, devices, dupes refused."""
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            for m in tar:
                if m.isdir():
                    continue
                if not m.isreg():
                    raise BundleError(f"{where}: member {m.name!r} is not a regular file")
                name = _clean_name(m.name)
                if name in files:
                    raise BundleError(f"{where}: member {name!r} appears twice")
                total += m.size
                if total > max_unpacked:
                    raise BundleError(f"{where}: unpacks to more than {max_unpacked} bytes")
                f = tar.extractfile(m)
                assert f is not None  # a regular file
                files[name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError(f"{where} is not a valid OPA bundle: {e}") from None
    return files


def read_directory(root: Path, max_unpacked: int = DEFAULT_MAX_UNPACKED) -> dict[str, bytes]:
    """A bundle directory's files (the layout of an unpacked bundle); symlinks refused."""
    files: dict[str, bytes] = {}
    total = 0
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise BundleError(f"{root}: {p.relative_to(root)} is a symlink; bundles hold regular files only")
        if p.is_dir():
            continue
        name = _clean_name(p.relative_to(root).as_posix())
        data = p.read_bytes()
        total += len(data)
        if total > max_unpacked:
            raise BundleError(f"{root}: holds more than {max_unpacked} bytes")
        files[name] = data
    return files


def directory_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def _json(name: str, raw: bytes, where: str):
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BundleError(f"{where}: {name} is not valid JSON: {e}") from None


def _under_roots(path: Sequence[str], roots: tuple[str, ...]) -> bool:
    p = "/".join(path)
    return any(r == "" or p == r or p.startswith(r + "/") for r in roots)


def _place(data: dict, path: list[str], value, name: str, roots: tuple[str, ...], where: str) -> None:
    """Put one data.json's value at its path; every key it adds must lie under the roots."""
    if not _under_roots(path, roots) and (
            not isinstance(value, dict) or not all(_under_roots([*path, k], roots) for k in value)):
        raise BundleError(f"{where}: {name} lies outside the manifest roots {list(roots)}")
    if not path:
        if not isinstance(value, dict):
            raise BundleError(f"{where}: the root data.json is not an object")
        data.update(value)
        return
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise BundleError(f"{where}: {name} collides with a non-object value")
    old = node.get(path[-1])
    if isinstance(old, dict) and isinstance(value, dict):
        old.update(value)
    else:
        node[path[-1]] = value


def parse_bundle(
    files: dict[str, bytes], digest: str, where: str, verifier: BundleVerifier | None = None,
) -> Bundle:
    """Turn a bundle's files into a Bundle: signatures first (before anything is parsed as
    policy), then the manifest, the data tree and the WASM module."""
    signed = SIGNATURES in files
    if verifier is not None:
        verifier.verify(files, where)  # raises BundleError: unsigned, wrong key, tampered
    manifest: dict = {}
    if MANIFEST in files:
        manifest = _json(MANIFEST, files[MANIFEST], where)
        if not isinstance(manifest, dict):
            raise BundleError(f"{where}: .manifest is not an object")
    revision = manifest.get("revision", "")
    if not isinstance(revision, str):
        raise BundleError(f"{where}: .manifest revision is not a string")
    raw_roots = manifest.get("roots", [""])
    if not isinstance(raw_roots, list) or not all(isinstance(r, str) for r in raw_roots):
        raise BundleError(f"{where}: .manifest roots is not a list of strings")
    roots = tuple(r.strip("/") for r in raw_roots)

    data: dict = {}
    for name in sorted(files, key=lambda n: n.count("/")):  # parents before children
        if PurePosixPath(name).name == "data.json":
            _place(data, name.split("/")[:-1], _json(name, files[name], where), name, roots, where)

    module = "policy.wasm"
    wasm_list = manifest.get("wasm")
    if isinstance(wasm_list, list) and wasm_list:
        modules = {str(w.get("module", "")).lstrip("/") for w in wasm_list if isinstance(w, dict)}
        if len(modules) != 1:
            raise BundleError(f"{where}: .manifest names {len(modules)} wasm modules; ccr loads exactly one")
        module = modules.pop()
    wasm = files.get(module)
    if wasm is None:
        raise BundleError(f"{where} has no {module}; build it with `opa build -t wasm`")
    return Bundle(wasm=wasm, data=data, digest=digest, path=where, revision=revision, roots=roots,
                  signed=signed, files=tuple(sorted(files)))


def load_bundle_bytes(raw: bytes, where: str, verifier: BundleVerifier | None = None,
                      max_unpacked: int = DEFAULT_MAX_UNPACKED) -> Bundle:
    files = unpack_tarball(raw, where, max_unpacked)
    return parse_bundle(files, hashlib.sha256(raw).hexdigest(), where, verifier)


def read_bundle(path: str | Path, verifier: BundleVerifier | None = None) -> Bundle:
    """A bundle from a .tar.gz file or a bundle directory."""
    p = Path(path)
    try:
        if p.is_dir():
            files = read_directory(p)
            return parse_bundle(files, directory_digest(files), str(p), verifier)
        raw = p.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read policy bundle {p}: {e.strerror}") from None
    return load_bundle_bytes(raw, str(p), verifier)
