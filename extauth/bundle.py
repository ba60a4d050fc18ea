"""Build and read OPA WASM policy bundles (`opa build -t wasm`)."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import orjson


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


def build_bundle(policy_dir: str | Path, out_path: str | Path, entrypoint: str) -> Path:
    """Compile the Rego in `policy_dir` (plus its data.json) to a WASM bundle at `out_path`.

    `*_test.rego` files are left out of the bundle; run `opa test` for them.
    """
    src = Path(policy_dir)
    if not src.is_dir():
        raise BundleError(f"policy directory {src} does not exist")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cmd = [find_opa(), "build", "-t", "wasm", "-e", entrypoint, "--ignore", "*_test.rego",
           "-o", str(tmp), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        detail = (proc.stderr or proc.stdout).strip()
        raise BundleError(f"opa build of {src} (entrypoint {entrypoint}) failed:\n{detail}")
    tmp.replace(out)  # atomic: a reader never sees half a bundle
    return out


@dataclass(frozen=True)
class Bundle:
    wasm: bytes
    data: dict
    digest: str  # sha256 of the bundle file; keys the decision cache
    path: str


def read_bundle(path: str | Path) -> Bundle:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read policy bundle {p}: {e.strerror}") from None
    wasm: bytes | None = None
    data: dict = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            for m in tar.getmembers():
                name = m.name.lstrip("/")
                if name == "policy.wasm":
                    wasm = tar.extractfile(m).read()  # type: ignore[union-attr]
                elif name == "data.json":
                    data = orjson.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, orjson.JSONDecodeError) as e:
        raise BundleError(f"{p} is not a valid OPA bundle: {e}") from None
    if wasm is None:
        raise BundleError(f"{p} has no policy.wasm; build it with `opa build -t wasm`")
    return Bundle(wasm=wasm, data=data, digest=hashlib.sha256(raw).hexdigest(), path=str(p))
