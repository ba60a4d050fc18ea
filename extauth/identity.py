"""Authentication: from the request's credential (or its verified peer) to a Principal.

One credential decides: an API key (`x-api-key`, or `Authorization: Bearer ccr_...`),
or a bearer token that one of the token verifiers accepts (OIDC IdP tokens, gateway
sessions). A credential that is present but invalid is refused; it never falls back
to another identity. With no credential at all, a verified SPIFFE peer (mTLS on the
listener) is the principal when the config allows workloads to call without a key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

from ccr.config import SpiffeSettings
from extauth.deny import Deny
from extauth.keys import KEY_PREFIX, KeyRecord, KeyStore
from extauth.principal import Principal, PrincipalKind
from extauth.spiffe import SpiffeIdError, parse_spiffe_id, svid_spiffe_id

MISSING_CREDENTIAL = (
    "missing credentials: send your gateway key in the x-api-key header "
    "or as 'Authorization: Bearer <key or token>'"
)
INVALID_KEY = (
    "invalid API key: the key is unknown, expired or has been revoked; "
    "check it or ask your gateway administrator for a new one (`ccr keys create`)"
)
UNKNOWN_TOKEN = (
    "invalid bearer token: it is neither a gateway API key nor a token from a trusted "
    "identity provider; sign in again (`ccr login`) or use an API key"
)


class TokenVerifier(Protocol):
    """Verifies one family of bearer tokens (an OIDC issuer set, gateway sessions)."""

    def accepts(self, token: str) -> bool:
        """Cheap test (no signature work): is this token one this verifier judges?"""

    async def verify(self, token: str) -> Principal:
        """The principal, or raise Deny(401, ...) naming what is wrong with the token."""


def credential_from(headers: Mapping[str, str]) -> str | None:
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    auth = headers.get("authorization", "")
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def key_principal(rec: KeyRecord, spiffe_id: str | None = None) -> Principal:
    return Principal(kind=PrincipalKind.KEY, id=rec.id, name=rec.name, groups=rec.groups, tenant=rec.tenant,
                     owner=rec.owner, key_id=rec.id, spiffe_id=spiffe_id, rpm=rec.rpm)


class Identity:
    def __init__(self, keys: KeyStore, verifiers: Sequence[TokenVerifier] = (),
                 spiffe: SpiffeSettings | None = None) -> None:
        self.keys = keys
        self.verifiers = list(verifiers)
        self.spiffe = spiffe or SpiffeSettings()

    async def authenticate(self, headers: Mapping[str, str], peer_spiffe_id: str | None = None,
                           peer_certificate: str | None = None) -> Principal:
        workload = self.workload(peer_spiffe_id, peer_certificate)
        cred = credential_from(headers)
        if cred is None:
            if workload is not None and self.spiffe.allow_without_key:
                return workload
            if workload is not None:
                raise Deny(401, "authentication_error",
                           f"{MISSING_CREDENTIAL}; workload {workload.id} must present one too "
                           "(identity.spiffe.allow_without_key is off)")
            raise Deny(401, "authentication_error", MISSING_CREDENTIAL)
        spiffe_id = workload.id if workload is not None else None
        if cred.startswith(KEY_PREFIX):
            rec = await self.keys.lookup(cred)
            if rec is None:
                raise Deny(401, "authentication_error", INVALID_KEY)
            return key_principal(rec, spiffe_id)
        for v in self.verifiers:
            if v.accepts(cred):
                p = await v.verify(cred)
                return p if spiffe_id is None else dataclasses.replace(p, spiffe_id=spiffe_id)
        raise Deny(401, "authentication_error", INVALID_KEY if "x-api-key" in headers else UNKNOWN_TOKEN)

    def workload(self, peer: str | None, certificate: str | None = None) -> Principal | None:
        """The workload principal of the verified peer certificate, when SPIFFE is on.

        `peer` is what Envoy reports (the first URI SAN); `certificate`, when Envoy sends
        it (PEM), must be an X.509-SVID with exactly that one URI SAN. A peer identity that
        is not a SPIFFE ID, or is from a trust domain the gateway does not trust, is
        refused even next to a valid key: it is not understood.
        """
        if not self.spiffe.enabled or not (peer or certificate):
            return None
        if certificate:
            try:
                uri = svid_spiffe_id(certificate)
            except SpiffeIdError as e:
                raise Deny(401, "authentication_error",
                           f"client certificate is not an X.509-SVID: it {e}") from None
            if peer and uri != peer:  # Envoy and the certificate disagree: trust neither
                raise Deny(401, "authentication_error", "client certificate identity is ambiguous")
            peer = uri
        assert peer is not None
        shown = peer if len(peer) <= 200 else peer[:200] + "..."
        try:
            sid = parse_spiffe_id(peer)
        except SpiffeIdError as e:
            raise Deny(401, "authentication_error",
                       f"client certificate identity {shown!r} is not a valid SPIFFE ID: it {e}; "
                       "present an X.509 SVID whose URI SAN is spiffe://<trust-domain>/<path>") from None
        if sid.trust_domain not in self.spiffe.trust_domains:
            raise Deny(403, "permission_error",
                       f"workload {shown}: trust domain {sid.trust_domain!r} is not trusted by this gateway "
                       "(identity.spiffe.trust_domains)")
        return workload_principal(str(sid))


def workload_principal(spiffe_id: str) -> Principal:
    """The principal of a verified SPIFFE ID (already parsed and trusted)."""
    trust_domain = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
    return Principal(kind=PrincipalKind.WORKLOAD, id=spiffe_id, name=spiffe_id,
                     tenant=None, spiffe_id=spiffe_id, issuer=f"spiffe://{trust_domain}",
                     claims=(("trust_domain", trust_domain),))
