"""Provider credentials, handed to Envoy and to no other process.

Envoy injects a passthrough provider's credential itself (the credential_injector
upstream filter), so no Python hop sits on the request path just to swap a header.
It reads the credential from a file-based SDS resource: a DiscoveryResponse holding
one generic Secret, written 0600 inside the run directory (0700). Envoy watches the
file, so replacing it (atomically, as `write_secret` does) rotates the credential
without a restart. In a deployment the same file is a mounted secret volume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def secret_name(provider: str) -> str:
    """The SDS resource name of a provider's credential."""
    return f"ccr_provider_credential_{provider}"


def write_secret(path: Path, provider: str, value: str) -> Path:
    """Write (or atomically replace) the SDS file for one provider's credential."""
    if not value or any(c in value for c in "\r\n\0"):
        raise ValueError(f"provider {provider}: the credential is empty or holds a line break or NUL")
    doc = {"resources": [{"@type": SECRET_TYPE, "name": secret_name(provider),
                          "generic_secret": {"secret": {"inline_string": value}}}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    # This process's own temporary name: replicas on one machine (`ccr serve envoy --instance`) may
    # write the same file at once; each rename is whole, and they write the same credential.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    # rename is atomic, and Envoy's path SDS watches for moves into place.
    tmp.replace(path)
    return path
