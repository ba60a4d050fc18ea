# Endpoint and model access control for ccr principals (API keys, OIDC users, SPIFFE workloads),
# and the composition of every shipped policy into one decision.
#
# Entry point: data.ccr.authz.decision -> the result (policies/README.md, "Result"):
#   {"allow": bool, "reason": string, "status": int (denials), "headers": {...},
#    "metadata": {"region": string, "labels": {...}, "ratelimit": {...}}}
# Input: version 1 (policies/README.md, "Input v1"; extauth/policy_input.py):
#   {"version": 1, "principal": {"kind", "id", "name", "groups", "tenant", "key_id", "spiffe_id", "issuer", "claims"},
#    "source": {"address", "spiffe_id"},
#    "request": {"method", "path", "host", "query", "headers", "endpoint", "kind", "params", "model",
#                "max_tokens", "stream", "thinking_budget", "tools", "tool_count", "size", "region_hint",
#                "pii", "text", "text_truncated"}}
# `pii` (present only when data.pii.mode is block or log, on Messages requests) lists what extauth's
# scanner found in the request's text as {"kind", "location"}, never the value (see "prompt PII" below).
# `endpoint` is the registry name extauth matched (extauth/endpoints.py: "messages.create",
# "batches.get", ...), `kind` its family (messages|models|batches|files), `params` its path
# parameters ({"batch_id": ...}). A request without a known endpoint is denied.
#
# Data:
#   data.endpoint_access maps a group to endpoint patterns (an exact name or a prefix followed
#   by "*"); the group "*" applies to every principal.
#   data.model_access maps a group to model patterns, the same way.
#   data.workload_access maps a SPIFFE ID, and data.trust_domain_access a trust domain, to
#   model patterns for workloads.
#   Tiers (models per tier and ceilings): tiers.rego. Data residency: residency.rego.
# Only builtins OPA compiles natively to WASM are used (startswith/endswith/trim_suffix/concat/
# format_int), so evaluation never calls the host.
package ccr.authz

import data.ccr.residency
import data.ccr.tiers

# In order: access (endpoint, model by group/workload, model by tier), residency, the tier's
# ceilings, then prompt PII; the first that refuses decides. An allow carries the region binding
# and the tier (audit label, rate-limit descriptor value).
decision := {"allow": false, "status": 403, "reason": access.reason} if {
	not access.allow
} else := residency.denial if {
	residency.denial
} else := tiers.denial if {
	tiers.denial
} else := {"allow": false, "status": 403, "reason": pii_denial} if {
	pii_blocks
} else := object.union(
	{"allow": true, "reason": allow_reason, "metadata": allow_metadata},
	residency.headers,
)

allow_reason := concat("", [access.reason, "; ", pii_log_note]) if pii_logs

else := access.reason

allow_metadata := {
	"region": residency.region,
	"labels": {"tier": tiers.tier, "region": residency.region},
	"ratelimit": {"tier": tiers.tier},
} if {
	residency.region
} else := {"labels": {"tier": tiers.tier}, "ratelimit": {"tier": tiers.tier}}

default access := {"allow": false, "reason": "no policy rule allowed this request"}

access := {"allow": false, "reason": endpoint_denial} if {
	not endpoint_allowed
} else := {"allow": false, "reason": "this endpoint needs a model and the request names none"} if {
	needs_model
	not has_model
} else := {"allow": true, "reason": concat("", ["endpoint ", input.request.endpoint, " allowed"])} if {
	not has_model
} else := {"allow": false, "reason": tiers.model_denial} if {
	model_allowed
	not tiers.model_permitted
} else := {"allow": true, "reason": concat("", ["model ", input.request.model, " allowed"])} if {
	model_allowed
} else := {"allow": false, "reason": denial_reason}

# -- endpoints ------------------------------------------------------------------

known_endpoint if {
	is_string(input.request.endpoint)
	input.request.endpoint != ""
}

endpoint_allowed if {
	known_endpoint
	some pattern in data.endpoint_access["*"]
	pattern_matches(pattern, input.request.endpoint)
}

endpoint_allowed if {
	known_endpoint
	some group in input.principal.groups
	some pattern in data.endpoint_access[group]
	pattern_matches(pattern, input.request.endpoint)
}

endpoint_denial := "this request names no endpoint the gateway knows; it is not forwarded" if {
	not known_endpoint
} else := concat("", [
	kind_label, " '", input.principal.name, "' may not call ", input.request.method, " ",
	input.request.path, " (", input.request.endpoint, "). Ask your gateway administrator for access.",
])

# Messages calls carry the model in the body; extauth always passes it for them.
needs_model if input.request.kind == "messages"

# -- models ---------------------------------------------------------------------

has_model if {
	is_string(input.request.model)
	input.request.model != ""
}

model_allowed if {
	some group in input.principal.groups
	some pattern in data.model_access[group]
	pattern_matches(pattern, input.request.model)
}

# Workloads (SPIFFE): an entry for the exact SPIFFE ID in data.workload_access wins;
# otherwise the workload's trust domain entry in data.trust_domain_access applies.
model_allowed if {
	some pattern in workload_patterns
	pattern_matches(pattern, input.request.model)
}

workload_trust_domain := split(trim_prefix(input.principal.spiffe_id, "spiffe://"), "/")[0] if {
	input.principal.kind == "workload"
}

workload_patterns := data.workload_access[input.principal.spiffe_id] if {
	input.principal.kind == "workload"
} else := data.trust_domain_access[workload_trust_domain] if {
	input.principal.kind == "workload"
}

pattern_matches(pattern, value) if pattern == value

pattern_matches(pattern, value) if {
	endswith(pattern, "*")
	startswith(value, trim_suffix(pattern, "*"))
}

# Patterns the caller's groups grant, sorted and de-duplicated, for the message.
allowed_patterns contains pattern if {
	some group in input.principal.groups
	some pattern in data.model_access[group]
}

allowed_patterns contains pattern if {
	some pattern in workload_patterns
}

allowed_text := concat(", ", sort(allowed_patterns)) if count(allowed_patterns) > 0

else := "none"

kind_labels := {"key": "API key", "user": "user", "workload": "workload"}

default kind_label := "principal"

kind_label := kind_labels[input.principal.kind]

denial_reason := concat("", [
	kind_label, " '", input.principal.name, "' (groups: ", concat(", ", input.principal.groups),
	") may not use model '", input.request.model, "'; allowed models: ", allowed_text,
	". Use an allowed model or ask your gateway administrator for access.",
])

# -- prompt PII -----------------------------------------------------------------
#
# extauth scans the request's text once (extauth/pii.py) when data.pii.mode is "block" or "log",
# and passes input.request.pii = [{"kind", "location"}] (kinds: ssn, card, iban, email, or the
# name of a pattern in data.pii.patterns; never the matched value). Here:
#   block: a finding of a kind in data.pii.kinds (or of a team pattern) denies the request,
#          unless the principal is in one of data.pii.exempt_groups (then it is logged);
#   log:   the request is allowed and the findings are named in the decision's reason;
#   off:   nothing is scanned, nothing here applies.
# WASM-native builtins only, as above.

default pii_mode := "off"

pii_mode := data.pii.mode if is_string(data.pii.mode)

pii_counted(kind) if {
	some k in data.pii.kinds
	k == kind
}

pii_counted(kind) if {
	some p in data.pii.patterns
	p.name == kind
}

pii_exempt if {
	some group in input.principal.groups
	some exempt in data.pii.exempt_groups
	group == exempt
}

pii_labels := {"ssn": "a US SSN", "card": "a payment card number", "iban": "an IBAN", "email": "an email address"}

pii_label(kind) := label if {
	label := pii_labels[kind]
} else := concat("", ["a match for the pattern '", kind, "'"])

# The counted findings, in the order the scanner reported them: "a US SSN (messages[2].content[0])".
pii_found := [concat("", [pii_label(f.kind), " (", f.location, ")"]) |
	some f in input.request.pii
	pii_counted(f.kind)
]

pii_blocks if {
	pii_mode == "block"
	count(pii_found) > 0
	not pii_exempt
}

pii_logs if {
	pii_mode in {"block", "log"}
	count(pii_found) > 0
	not pii_blocks
}

pii_denial := concat("", [
	"prompt contains ", concat(", ", pii_found),
	"; remove it, or ask your gateway administrator (personal data is blocked by policy)",
])

pii_log_note := concat("", ["personal data logged: ", concat(", ", pii_found)])
