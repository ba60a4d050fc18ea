"""A per-run certificate authority for mutual TLS between the gateway's own processes.

`ccr up` issues, at start, one SPIFFE-style X.509 identity per process that takes part
(`spiffe://ccr.local/<name>`, plus loopback IP SANs so plain gRPC clients can verify the
server), signed by a CA that exists only for this run. The CA's private key is never
written anywhere: once the run's identities are issued, nobody can mint another one, so a
certificate chaining to the run CA proves it was handed out by this `ccr up`.

Files live in one 0700 directory with 0600 private keys; `Runtime.mtls` carries only
their paths. Issue 10 replaces this issuer with SPIRE SVIDs; the consumers (Envoy's
UpstreamTlsContext, `ccr.service.server_credentials`, the peer check) stay the same.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict

from ccr.contract import RUN_TRUST_DOMAIN

# Every start issues fresh identities; a gateway that runs longer than this must restart.
DEFAULT_VALIDITY = dt.timedelta(days=365)
# Tolerate a little clock difference between issuing and checking.
BACKDATE = dt.timedelta(minutes=5)
LOOPBACK_IPS = ("127.0.0.1", "::1")


def spiffe_id(name: str, trust_domain: str = RUN_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/{name}"


class Identity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    spiffe_id: str
    cert: str  # PEM certificate path
    key: str  # PEM private key path (0600)


class RunPki(BaseModel):
    """Paths of the run's trust bundle and the identities issued from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    trust_domain: str = RUN_TRUST_DOMAIN
    ca: str  # PEM trust bundle path (the run CA's certificate)
    identities: dict[str, Identity] = {}

    def identity(self, name: str) -> Identity:
        try:
            return self.identities[name]
        except KeyError:
            raise KeyError(f"no mTLS identity {name!r} was issued for this run "
                           f"(issued: {sorted(self.identities)})") from None


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start: never a moment where another user could open it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca(trust_domain: str, now: dt.datetime, validity: dt.timedelta
        ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ccr"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"ccr run CA ({trust_domain})")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, uri: str,
               ips: Iterable[str] = LOOPBACK_IPS, dns: Iterable[str] = ("localhost",),
               validity: dt.timedelta = DEFAULT_VALIDITY) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An X.509-SVID-shaped leaf: one URI SAN, usable as TLS server and client."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    sans += [x509.DNSName(d) for d in dns]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ccr"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, uri.rsplit("/", 1)[-1])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def issue_run_pki(directory: Path, names: Iterable[str], *, trust_domain: str = RUN_TRUST_DOMAIN,
                  extra_ips: Iterable[str] = (), validity: dt.timedelta = DEFAULT_VALIDITY) -> RunPki:
    """A fresh run CA and one identity per name under `directory` (replaced if present).

    `extra_ips` adds IP SANs (a non-loopback bind address) to every identity.
    """
    # Emptied, not removed: the directory may be a mount point (a container volume).
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = _ca(trust_domain, now, validity)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(_cert_pem(ca_cert))
    ips = list(dict.fromkeys([*LOOPBACK_IPS, *extra_ips]))
    identities: dict[str, Identity] = {}
    for name in names:
        uri = spiffe_id(name, trust_domain)
        key, cert = issue_leaf(ca_key, ca_cert, uri, ips=ips, validity=validity)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        _write_private(key_path, _key_pem(key))
        cert_path.write_bytes(_cert_pem(cert))
        identities[name] = Identity(spiffe_id=uri, cert=str(cert_path), key=str(key_path))
    # ca_key goes out of scope here: no further identity can be issued for this run.
    return RunPki(trust_domain=trust_domain, ca=str(ca_path), identities=identities)


def uri_sans(cert_pem: bytes) -> list[str]:
    """The URI SANs of a PEM certificate (a verified peer's, from gRPC's auth context)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


PKI_FILE = "pki.json"


def save_pki(pki: RunPki, directory: Path) -> Path:
    """Record the identities issued into `directory` for `load_pki`: file names relative to the
    directory, so it can be copied or mounted elsewhere (a Kubernetes Secret, a volume)."""
    def rel(p: str) -> str:
        return str(Path(p).resolve().relative_to(directory.resolve()))

    doc = RunPki(trust_domain=pki.trust_domain, ca=rel(pki.ca), identities={
        n: Identity(spiffe_id=i.spiffe_id, cert=rel(i.cert), key=rel(i.key)) for n, i in pki.identities.items()})
    path = directory / PKI_FILE
    path.write_text(doc.model_dump_json(indent=2))
    return path


def load_pki(directory: Path) -> RunPki:
    """The identities in `directory` (written by save_pki), with paths where the directory is now."""
    path = directory / PKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no mTLS identities here; create them with `ccr pki issue {directory}`")
    doc = RunPki.model_validate_json(path.read_text())
    base = directory.resolve()
    return RunPki(trust_domain=doc.trust_domain, ca=str(base / doc.ca), identities={
        n: Identity(spiffe_id=i.spiffe_id, cert=str(base / i.cert), key=str(base / i.key))
        for n, i in doc.identities.items()})

