"""Who is calling: the principal every decision, limit and audit row is about.

Three kinds, and policy sees which: a machine holding a gateway API key, a person
signed in through OIDC (an IdP token or a gateway session minted after sign-in),
and a workload identified by the SPIFFE ID of its verified client certificate.
A Principal is immutable and hashable so decisions can be cached by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class PrincipalKind(StrEnum):
    KEY = "key"
    USER = "user"
    WORKLOAD = "workload"


@dataclass(frozen=True, slots=True)
class Principal:
    kind: PrincipalKind
    # Stable and unique across kinds: the key id, "oidc:<issuer>#<sub>", or the SPIFFE ID.
    # Limits, budgets and audit rows are keyed by it.
    id: str
    # For people to read: the key's name, the user's e-mail or username, the SPIFFE ID.
    name: str
    groups: tuple[str, ...] = ()
    tenant: str | None = None
    owner: str | None = None  # who answers for a gateway API key (a person or team)
    key_id: str | None = None  # set when the credential was a gateway API key
    spiffe_id: str | None = None  # the verified peer certificate's SPIFFE ID, when there is one
    issuer: str | None = None  # OIDC issuer (or the gateway, for its own sessions)
    rpm: int | None = None  # the principal's own requests-per-minute limit, if it has one
    # Extra claims the config selects for policy, as sorted (name, value) pairs.
    claims: tuple[tuple[str, str], ...] = ()

    def policy_input(self) -> dict[str, Any]:
        """The `input.principal` document the Rego policy sees."""
        return {
            "kind": str(self.kind),
            "id": self.id,
            "name": self.name,
            "groups": list(self.groups),
            "tenant": self.tenant,
            "owner": self.owner,
            "key_id": self.key_id,
            "spiffe_id": self.spiffe_id,
            "issuer": self.issuer,
            "claims": dict(self.claims),
        }
