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
