"""Authentication: from the request's credential (or its verified peer) to a Principal.

One credential decides: an API key (`x-api-key`, or `Authorization: Bearer ccr_...`),
or a bearer token that one of the token verifiers accepts (OIDC IdP tokens, gateway
sessions). A credential that is present but invalid is refused; it never falls back
to another identity. With no credential at all, a verified SPIFFE peer (mTLS on the
listener) is the principal when the config allows workloads to call without a key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from extauth.deny import Deny
from extauth.keys import KEY_PREFIX, KeyRecord, KeyStore
from extauth.principal import Principal, PrincipalKind

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
    return Principal(kind=PrincipalKind.KEY, id=rec.id, name=rec.name, groups=rec.groups,
                     key_id=rec.id, spiffe_id=spiffe_id, rpm=rec.rpm)


class Identity:
    def __init__(self, keys: KeyStore, verifiers: Sequence[TokenVerifier] = (),
                 spiffe_principals: bool = False) -> None:
        self.keys = keys
        self.verifiers = list(verifiers)
        self.spiffe_principals = spiffe_principals

    async def authenticate(self, headers: Mapping[str, str], peer_spiffe_id: str | None = None) -> Principal:
        cred = credential_from(headers)
        if cred is None:
            if peer_spiffe_id and self.spiffe_principals:
                return workload_principal(peer_spiffe_id)
            raise Deny(401, "authentication_error", MISSING_CREDENTIAL)
        if cred.startswith(KEY_PREFIX):
            rec = await self.keys.lookup(cred)
            if rec is None:
                raise Deny(401, "authentication_error", INVALID_KEY)
            return key_principal(rec, peer_spiffe_id)
        for v in self.verifiers:
            if v.accepts(cred):
                return await v.verify(cred)
        raise Deny(401, "authentication_error", INVALID_KEY if "x-api-key" in headers else UNKNOWN_TOKEN)


def workload_principal(spiffe_id: str) -> Principal:
    trust_domain = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
    return Principal(kind=PrincipalKind.WORKLOAD, id=spiffe_id, name=spiffe_id,
                     tenant=None, spiffe_id=spiffe_id, issuer=f"spiffe://{trust_domain}")
