"""SPIFFE IDs of workloads: a strict parser and the trust-domain check.

Envoy hands ext_authz the URI SAN of the verified client certificate as
`source.principal` (or the subject DN when the certificate has no URI SAN). Only a
well-formed SPIFFE ID from an allowed trust domain becomes a workload principal;
anything else is refused, never guessed at. The grammar is the SPIFFE ID standard's:
`spiffe://<trust-domain><path>`, lower-case scheme and trust domain (letters,
digits, '.', '-', '_'), no port, user info, query or fragment, and a path of
non-empty segments of letters, digits, '.', '-', '_' with no '.' or '..' segment
and no trailing slash. A workload's ID must have a path (the bare trust-domain
ID names the domain, not a workload).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class SpiffeIdError(ValueError):
    """Not a well-formed SPIFFE ID of a workload; the message says why."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # starts with "/"

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"


def parse_spiffe_id(text: str) -> SpiffeId:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise SpiffeIdError(f"longer than {MAX_ID_BYTES} bytes")
    if not text.startswith(SCHEME):
        raise SpiffeIdError("does not start with 'spiffe://'")
    rest = text[len(SCHEME):]
    domain, slash, path = rest.partition("/")
    if not domain:
        raise SpiffeIdError("has no trust domain")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise SpiffeIdError(
            "trust domain may hold only lower-case letters, digits, '.', '-' and '_' (no port or user info)")
    if not slash:
        raise SpiffeIdError("has no path: a trust domain alone does not name a workload")
    segments = path.split("/")
    for seg in segments:
        if seg == "":
            raise SpiffeIdError("path has an empty segment or a trailing slash")
        if seg in (".", ".."):
            raise SpiffeIdError("path has a '.' or '..' segment")
        if not _SEGMENT.fullmatch(seg):
            raise SpiffeIdError("path may hold only letters, digits, '.', '-' and '_' (no query or fragment)")
    return SpiffeId(domain, "/" + path)


_SVID_CACHE_MAX = 10_000
_svid_cache: dict[str, str | SpiffeIdError] = {}


def svid_spiffe_id(cert_pem: str) -> str:
    """The SPIFFE ID of a verified peer certificate (PEM), which must be an X.509-SVID:
    a leaf with exactly one URI SAN. Envoy reports only the first URI SAN as the peer's
    principal; a certificate naming several identities is ambiguous and refused.
    Results are cached by certificate (peers reconnect with the same SVID)."""
    hit = _svid_cache.get(cert_pem)
    if hit is None:
        try:
            hit = _svid_uri(cert_pem)
        except SpiffeIdError as e:
            hit = e
        if len(_svid_cache) >= _SVID_CACHE_MAX:
            _svid_cache.clear()
        _svid_cache[cert_pem] = hit
    if isinstance(hit, SpiffeIdError):
        raise hit
    return hit


def _svid_uri(cert_pem: str) -> str:
    from cryptography import x509  # only workloads need it; keep extauth's import light

    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError:
        raise SpiffeIdError("could not be parsed as a PEM X.509 certificate") from None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise SpiffeIdError("is a CA certificate, not a workload's X.509-SVID")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        uris: list[str] = []
    else:
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SpiffeIdError(f"has {len(uris)} URI SANs; an X.509-SVID has exactly one (its SPIFFE ID)")
    return uris[0]
