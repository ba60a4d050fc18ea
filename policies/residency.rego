# Data residency: a request bound to a region is marked so routing keeps it there (failover
# included): the region goes into the result's metadata (dynamic metadata `region` and the
# x-ccr-region header; docs/contracts.md). A request asking for a region its principal may not
# use is denied.
#
# The binding comes from the principal, never from the request:
#   input.principal.claims.region   an IdP attribute the config passes (identity.oidc[].extra_claims)
#   data.residency.tenants[tenant]  the principal's tenant (API keys and OIDC users have one)
#   data.residency.groups[group]    a group; two groups binding to different regions are refused
# The client may ask for a region with the `ccr-region` header (input.request.region_hint); an
# unbound principal gets the region it asks for, a bound one only its own.
#   data.residency.regions: every region name the gateway knows; any other is refused (400).
#   data.residency.header: optional; also send the bound region upstream in this header (for a
#   provider or proxy that routes by it). Unset: the region stays inside the gateway.
package ccr.residency

# What the allowing result adds: {"headers": {name: region}}, or nothing.
headers := {"headers": {data.residency.header: region}} if {
	is_string(data.residency.header)
	region
} else := {}

known(r) if {
	some k in data.residency.regions
	k == r
}

hint := input.request.region_hint if is_string(input.request.region_hint)

group_regions contains r if {
	some g in input.principal.groups
	r := data.residency.groups[g]
}

bound := input.principal.claims.region if {
	is_string(input.principal.claims.region)
	input.principal.claims.region != ""
} else := t if {
	t := data.residency.tenants[input.principal.tenant]
} else := r if {
	count(group_regions) == 1
	some r in group_regions
}

# The region the request is bound to, when there is one.
region := bound if known(bound)

else := hint if known(hint)

# A denial {allow, status, reason}; undefined when residency allows the request.
denial := {"allow": false, "status": 400, "reason": concat("", [
	"region '", hint, "' (ccr-region header) is not one this gateway serves; known regions: ",
	concat(", ", sort(data.residency.regions)),
])} if {
	hint
	not known(hint)
} else := {"allow": false, "status": 403, "reason": concat("", [
	"'", input.principal.name, "' is bound to region '", bound, "' and may not use region '", hint,
	"'. Remove the ccr-region header or ask your gateway administrator.",
])} if {
	hint != bound
} else := {"allow": false, "status": 403, "reason": concat("", [
	"'", input.principal.name, "' is bound to region '", bound,
	"', which this gateway does not serve; ask your gateway administrator",
])} if {
	bound
	not known(bound)
} else := {"allow": false, "status": 403, "reason": concat("", [
	"'", input.principal.name, "' belongs to groups bound to different regions (",
	concat(", ", sort(group_regions)), "); ask your gateway administrator",
])} if {
	not bound
	count(group_regions) > 1
}
