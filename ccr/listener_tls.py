"""The gateway listener's certificate and client CA as file-based SDS secrets, for Envoy only.

`gateway.tls` names PEM files. Put inline in the listener, Envoy reads them once; as SDS secrets
read from a file Envoy watches (a DiscoveryResponse naming those PEM files, as ccr/credentials.py
does for provider credentials), replacing the certificate files (a rename into place, as cert-
manager, Kubernetes secret volumes and `mv` do) rotates the listener's certificate, or the CA its
clients are checked against, in the running Envoy: new handshakes use the new files, connections
already open keep theirs. The process that starts Envoy writes these files (`ccr up`, `ccr serve
envoy`); the router only points the listener at them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ccr.config import ListenerTLS
from ccr.credentials import SECRET_TYPE

CERT_SECRET = "ccr_listener_certificate"
CLIENT_CA_SECRET = "ccr_listener_client_ca"


def sds_file(sds_dir: str | Path, secret: str) -> Path:
    return Path(sds_dir) / f"{secret}.json"


def tls_file(base: Path, name: str, what: str) -> str:
    """A gateway.tls file (relative to the config's directory), which must exist."""
    path = Path(name) if Path(name).is_absolute() else base / name
    if not path.is_file():
        raise ValueError(f"gateway.tls.{what}: {path} is not a readable file")
    return str(path)


def _watched(*files: str) -> dict:
    # Envoy re-reads the pair when something is moved into this directory, and checks that the
    # certificate and key it read belong together (no half-rotated pair is ever served).
    dirs = {os.path.dirname(f) for f in files}
    return {"watched_directory": {"path": dirs.pop()}} if len(dirs) == 1 else {}


def secrets(tls: ListenerTLS, base: Path) -> dict[str, dict]:
    """Secret name -> the Secret resource for the listener's certificate (and client CA)."""
    cert, key = tls_file(base, tls.cert_file, "cert_file"), tls_file(base, tls.key_file, "key_file")
    out = {CERT_SECRET: {"@type": SECRET_TYPE, "name": CERT_SECRET, "tls_certificate": {
        "certificate_chain": {"filename": cert}, "private_key": {"filename": key}, **_watched(cert, key)}}}
    if tls.client_ca_file:
        ca = tls_file(base, tls.client_ca_file, "client_ca_file")
        out[CLIENT_CA_SECRET] = {"@type": SECRET_TYPE, "name": CLIENT_CA_SECRET, "validation_context": {
            "trusted_ca": {"filename": ca}, **_watched(ca)}}
    return out


def write_listener_sds(tls: ListenerTLS, base: Path, sds_dir: Path) -> None:
    """Write (atomically replace) one SDS file per secret under `sds_dir`."""
    sds_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, resource in secrets(tls, base).items():
        path = sds_file(sds_dir, name)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"resources": [resource]}))
        tmp.replace(path)


def sds_secret_config(sds_dir: str, secret: str) -> dict:
    return {"name": secret, "sds_config": {"path_config_source": {"path": str(sds_file(sds_dir, secret))},
                                           "resource_api_version": "V3"}}
