package ccr.residency_test

import data.ccr.authz

res := {"regions": ["us", "eu"], "tenants": {"acme-eu": "eu", "mars": "mars"}, "groups": {"eu-staff": "eu", "us-staff": "us"}}

req(tenant, groups, hint) := {
	"version": 1,
	"principal": {"kind": "key", "id": "key_1", "name": "ci-bot", "groups": array.concat(["default"], groups), "tenant": tenant, "claims": {}},
	"request": {
		"method": "POST", "path": "/v1/messages", "endpoint": "messages.create", "kind": "messages",
		"params": {}, "model": "claude-sonnet-4-5", "region_hint": hint, "size": 10, "tools": [], "tool_count": 0,
	},
}

decide(i) := d if {
	d := authz.decision with input as i with data.residency as res
}

test_tenant_binding_lands_in_metadata if {
	d := decide(req("acme-eu", [], null))
	d.allow
	d.metadata.region == "eu"
	d.metadata.labels.region == "eu"
}

test_bound_principal_may_ask_for_its_own_region if {
	d := decide(req("acme-eu", [], "eu"))
	d.allow
	d.metadata.region == "eu"
}

test_bound_principal_may_not_ask_for_another_region if {
	d := decide(req("acme-eu", [], "us"))
	not d.allow
	d.status == 403
	contains(d.reason, "'ci-bot' is bound to region 'eu' and may not use region 'us'")
}

test_unbound_principal_gets_the_region_it_asks_for if {
	d := decide(req(null, [], "us"))
	d.allow
	d.metadata.region == "us"
}

test_no_binding_no_hint_no_region if {
	d := decide(req(null, [], null))
	d.allow
	not d.metadata.region
}

test_unknown_region_hint_is_400 if {
	d := decide(req(null, [], "moon"))
	not d.allow
	d.status == 400
	contains(d.reason, "region 'moon'")
	contains(d.reason, "known regions: eu, us")
}

test_group_binding if {
	d := decide(req(null, ["eu-staff"], null))
	d.metadata.region == "eu"
	not decide(req(null, ["eu-staff"], "us")).allow
}

test_groups_binding_different_regions_are_refused if {
	d := decide(req(null, ["eu-staff", "us-staff"], null))
	not d.allow
	contains(d.reason, "bound to different regions (eu, us)")
}

test_tenant_beats_group if {
	d := decide(req("acme-eu", ["us-staff"], null))
	d.metadata.region == "eu"
}

test_claim_region_is_a_principal_attribute if {
	i := json.patch(req(null, [], "us"), [{"op": "add", "path": "/principal/claims/region", "value": "eu"}])
	d := decide(i)
	not d.allow
	contains(d.reason, "bound to region 'eu'")
}

test_binding_to_an_unserved_region_is_refused if {
	d := decide(req("mars", [], null))
	not d.allow
	contains(d.reason, "which this gateway does not serve")
}

test_residency_denial_comes_after_access if {
	i := json.patch(req("acme-eu", [], "us"), [{"op": "replace", "path": "/request/model", "value": "gpt-4o"}])
	d := decide(i)
	contains(d.reason, "may not use model 'gpt-4o'")
}

test_region_header_when_data_names_one if {
	d := authz.decision with input as req("acme-eu", [], null)
		with data.residency as object.union(res, {"header": "x-data-region"})
	d.headers == {"x-data-region": "eu"}
	not decide(req("acme-eu", [], null)).headers
	unbound := authz.decision with input as req(null, [], null)
		with data.residency as object.union(res, {"header": "x-data-region"})
	unbound.allow
	not unbound.headers
}
