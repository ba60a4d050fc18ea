"""Names that cross a process boundary, defined once.

Envoy, extauth, ratelimit, the adapter and the audit receiver agree on these;
docs/contracts.md says what travels under each name. Change a name here and
every side changes with it.
"""

from __future__ import annotations

# Dynamic metadata namespaces.
AUTHZ_NS = "envoy.filters.http.ext_authz"  # written by extauth's CheckResponse
USAGE_NS = "ccr.usage"  # written by the adapter at the end of each upstream attempt

# Rate limit domain of the route's descriptors.
RL_DOMAIN = "ccr"
# Descriptor entry every request carries: the principal id (from H_PRINCIPAL_ID).
RL_PRINCIPAL_KEY = "principal"

# Request headers extauth sets for the route and filters after it. Any client-sent
# header with this prefix is stripped before ext_authz runs, and all of them are
# removed before the request goes upstream.
CCR_HEADER_PREFIX = "x-ccr-"
H_PRINCIPAL_ID = "x-ccr-principal-id"  # Principal.id: what limits and audit rows key on
H_KEY_ID = "x-ccr-key-id"  # only when the credential was an API key
H_PRINCIPAL = "x-ccr-principal"
H_MODEL = "x-ccr-model"
H_PROVIDER = "x-ccr-provider"
H_CLUSTER = "x-ccr-cluster"
SET_HEADERS = (H_PRINCIPAL_ID, H_KEY_ID, H_PRINCIPAL, H_MODEL, H_PROVIDER, H_CLUSTER)

# gRPC initial metadata on the adapter's stream: which provider the attempt goes to.
ADAPTER_PROVIDER_MD = "x-ccr-provider"

# gRPC initial metadata on extauth's Check from the headers-only ext_authz filter that runs
# before the body is buffered (router/downstream.py): check identity only, no body, no model.
AUTHZ_PHASE_MD = "x-ccr-authz-phase"
AUTHZ_PHASE_IDENTITY = "identity"
