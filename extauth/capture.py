"""Which requests have their bodies kept (audit.bodies, docs/audit.md "Bodies"), and the facts
extauth hands on for them.

Decided here, from the principal extauth established (never from a client header). With no rule
configured `BodyCapture.from_config` is None and nothing on the request path changes. For an
enabled request the CheckResponse gets AUTHZ_BODY_CAPTURE (the request body, base64, cut at
audit.body_max_bytes) and the H_CAPTURE header, which tells the upstream filters to keep the reply.
Only the access-log receiver holds the key that encrypts them (audit/bodies.py).
"""

from __future__ import annotations

import base64

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb

from ccr.config import GatewayConfig
from ccr.contract import AUTHZ_BODY_CAPTURE, H_CAPTURE
from extauth.lean_json import Buffer
from extauth.principal import Principal

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class BodyCapture:
    def __init__(self, by_principal: dict[str, int], by_tenant: dict[str, int], max_bytes: int) -> None:
        self.by_principal = by_principal
        self.by_tenant = by_tenant
        self.max_bytes = max_bytes

    @classmethod
    def from_config(cls, config: GatewayConfig) -> BodyCapture | None:
        a = config.audit
        if not a.bodies:
            return None
        by_principal = {r.principal: r.retention_days for r in a.bodies if r.principal is not None}
        by_tenant = {r.tenant: r.retention_days for r in a.bodies if r.tenant is not None}
        return cls(by_principal, by_tenant, a.body_max_bytes)

    def retention_days(self, p: Principal | None) -> int | None:
        """The retention of `p`'s bodies, or None when they are not kept (its own rule first)."""
        if p is None:
            return None
        days = self.by_principal.get(p.id)
        if days is None and p.tenant is not None:
            days = self.by_tenant.get(p.tenant)
        return days

    def apply(self, resp: pb.CheckResponse, body: Buffer, days: int) -> None:
        """Mark an allowed request for capture (resp must be this request's own copy)."""
        view = memoryview(body)
        kept = view[: self.max_bytes]
        s = resp.dynamic_metadata.fields[AUTHZ_BODY_CAPTURE].struct_value
        s.update({"retention_days": days, "request": base64.b64encode(kept).decode("ascii"),
                  "request_bytes": len(view), "request_truncated": len(kept) < len(view)})
        resp.ok_response.headers.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=H_CAPTURE, value=str(self.max_bytes)), append_action=_OVERWRITE))
