package ccr.tiers_test

import data.ccr.authz
import data.ccr.tiers

tier_data := {
	"contractor": {
		"models": ["claude-haiku-*"], "max_tokens": 8192, "max_request_bytes": 1000,
		"max_thinking_budget": 4096, "max_tools": 2, "tools": ["read_*", "grep"],
	},
	"standard": {"max_tokens": 64000},
	"batch": {"max_tokens": 1024},
}

order := ["contractor", "batch", "standard"]

groups_map := {"contractors": "contractor", "batchers": "batch"}

msg(groups, model, extra) := object.union(
	{
		"version": 1,
		"principal": {"kind": "user", "id": "oidc:x#1", "name": "dana", "groups": groups, "claims": {}},
		"request": {
			"method": "POST", "path": "/v1/messages", "endpoint": "messages.create", "kind": "messages",
			"params": {}, "model": model, "max_tokens": 1024, "thinking_budget": null, "tools": [],
			"tool_count": 0, "size": 500,
		},
	},
	{"request": extra},
)

decide(i) := d if {
	d := authz.decision with input as i
		with data.tiers as tier_data
		with data.tier_order as order
		with data.tier_groups as groups_map
		with data.model_access as {"contractors": ["claude-*"], "default": ["claude-*"], "batchers": ["claude-*"]}
}

test_contractor_gets_haiku if {
	d := decide(msg(["contractors"], "claude-haiku-4-5", {}))
	d.allow
	d.metadata.labels.tier == "contractor"
	d.metadata.ratelimit.tier == "contractor"
}

test_contractor_denied_sonnet_even_with_a_group_grant if {
	d := decide(msg(["contractors"], "claude-sonnet-4-5", {}))
	not d.allow
	d.status == 403
	contains(d.reason, "tier 'contractor' may use only models claude-haiku-*")
}

test_most_restrictive_tier_wins if {
	t := tiers.tier with input as msg(["default", "batchers", "contractors"], "x", {})
		with data.tier_order as order with data.tier_groups as groups_map with data.tiers as tier_data
	t == "contractor"
}

test_default_tier_when_no_group_maps if {
	t := tiers.tier with input as msg(["default"], "x", {})
		with data.tier_order as order with data.tier_groups as groups_map
		with data.default_tier as "standard"
	t == "standard"
}

test_claim_names_a_tier if {
	i := json.patch(msg(["default"], "claude-haiku-4-5", {}), [{"op": "add", "path": "/principal/claims/tier", "value": "batch"}])
	t := tiers.tier with input as i with data.tier_order as order with data.tiers as tier_data
	t == "batch"
}

test_claim_naming_an_unknown_tier_is_ignored if {
	i := json.patch(msg(["contractors"], "claude-haiku-4-5", {}), [{"op": "add", "path": "/principal/claims/tier", "value": "platinum"}])
	t := tiers.tier with input as i with data.tier_order as order with data.tiers as tier_data with data.tier_groups as groups_map
	t == "contractor"
}

test_workload_tier if {
	i := {"principal": {"kind": "workload", "spiffe_id": "spiffe://example.org/job", "groups": []}, "request": {}}
	t := tiers.tier with input as i with data.workload_tiers as {"spiffe://example.org/job": "batch"}
		with data.tier_order as order
	t == "batch"
}

test_max_tokens_ceiling if {
	d := decide(msg(["contractors"], "claude-haiku-4-5", {"max_tokens": 8193}))
	not d.allow
	d.status == 403
	contains(d.reason, "max_tokens 8193 is above the ceiling of 8192 for tier 'contractor'")
	decide(msg(["contractors"], "claude-haiku-4-5", {"max_tokens": 8192})).allow
}

test_no_max_tokens_is_no_ceiling_breach if {
	decide(msg(["contractors"], "claude-haiku-4-5", {"max_tokens": null})).allow
}

test_request_size_ceiling_is_413 if {
	d := decide(msg(["contractors"], "claude-haiku-4-5", {"size": 1001}))
	not d.allow
	d.status == 413
	contains(d.reason, "request is 1001 bytes, above the ceiling of 1000 bytes")
}

test_thinking_budget_ceiling if {
	d := decide(msg(["contractors"], "claude-haiku-4-5", {"thinking_budget": 5000}))
	not d.allow
	contains(d.reason, "thinking budget 5000 is above the ceiling of 4096")
	not contains(d.reason, "adaptive")
	decide(msg(["contractors"], "claude-haiku-4-5", {"thinking_budget": 0})).allow
}

test_tool_count_ceiling if {
	d := decide(msg(["contractors"], "claude-haiku-4-5", {"tools": ["grep", "read_a", "read_b"], "tool_count": 3}))
	not d.allow
	contains(d.reason, "declares 3 tools, above the ceiling of 2")
}

test_tool_names_allowed_by_pattern if {
	decide(msg(["contractors"], "claude-haiku-4-5", {"tools": ["grep", "read_file"], "tool_count": 2})).allow
	d := decide(msg(["contractors"], "claude-haiku-4-5", {"tools": ["grep", "run_shell"], "tool_count": 2}))
	not d.allow
	contains(d.reason, "tool 'run_shell' is not allowed for tier 'contractor' (allowed: read_*, grep)")
}

test_standard_tier_has_no_tool_list if {
	decide(msg(["default"], "claude-sonnet-4-5", {"tools": ["run_shell"], "tool_count": 1})).allow
}

test_access_denial_comes_before_ceilings if {
	d := decide(msg(["nobody"], "claude-haiku-4-5", {"max_tokens": 999999}))
	not d.allow
	contains(d.reason, "may not use model")
}

test_shipped_contractor_tier if {
	i := json.patch(msg(["contractors"], "claude-haiku-4-5", {}), [{"op": "replace", "path": "/principal/groups", "value": ["contractors", "default"]}])
	d := authz.decision with input as i
	d.allow
	d.metadata.labels.tier == "contractor"
	not authz.decision.allow with input as json.patch(i, [{"op": "replace", "path": "/request/model", "value": "claude-opus-4-1"}])
}

test_adaptive_thinking_counts_max_tokens if {
	d := decide(msg(["contractors"], "claude-haiku-4-5", {"max_tokens": 8000, "thinking": "adaptive", "thinking_budget": 8000}))
	not d.allow
	contains(d.reason, "thinking budget 8000 is above the ceiling of 4096")
	contains(d.reason, "adaptive thinking without budget_tokens may use all of max_tokens")
}
