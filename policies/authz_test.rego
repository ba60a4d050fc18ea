package ccr.authz_test

import data.ccr.authz

access := {
	"default": ["claude-*"],
	"haiku-only": ["claude-haiku-*", "claude-3-5-haiku-latest"],
	"exact": ["claude-opus-4-1"],
}

endpoints := {"*": ["messages.*", "models.*"], "batch-users": ["batches.*"], "auditors": ["batches.get"]}

req(groups, model) := {
	"principal": {"kind": "key", "key_id": "key_0123456789ab", "name": "ci-bot", "groups": groups},
	"request": {
		"method": "POST", "path": "/v1/messages", "model": model,
		"endpoint": "messages.create", "kind": "messages", "params": {},
	},
}

call(groups, method, path, endpoint, kind, params) := {
	"principal": {"kind": "key", "key_id": "key_0123456789ab", "name": "ci-bot", "groups": groups},
	"request": {
		"method": method, "path": path, "model": null,
		"endpoint": endpoint, "kind": kind, "params": params,
	},
}

test_default_group_allows_any_claude_model if {
	d := authz.decision with input as req(["default"], "claude-sonnet-4-5") with data.model_access as access
	d.allow
}

test_default_group_denies_other_vendor if {
	d := authz.decision with input as req(["default"], "gpt-4o") with data.model_access as access
	not d.allow
	contains(d.reason, "gpt-4o")
}

test_haiku_only_allows_haiku if {
	d := authz.decision with input as req(["haiku-only"], "claude-haiku-4-5") with data.model_access as access
	d.allow
}

test_haiku_only_allows_exact_alias if {
	d := authz.decision with input as req(["haiku-only"], "claude-3-5-haiku-latest") with data.model_access as access
	d.allow
}

test_haiku_only_denies_sonnet_with_reason if {
	d := authz.decision with input as req(["haiku-only"], "claude-sonnet-4-5") with data.model_access as access
	not d.allow
	contains(d.reason, "ci-bot")
	contains(d.reason, "claude-sonnet-4-5")
	contains(d.reason, "claude-haiku-*")
}

test_exact_pattern_is_not_a_prefix if {
	d := authz.decision with input as req(["exact"], "claude-opus-4-1-extra") with data.model_access as access
	not d.allow
}

test_exact_pattern_matches_itself if {
	d := authz.decision with input as req(["exact"], "claude-opus-4-1") with data.model_access as access
	d.allow
}

test_any_group_suffices if {
	d := authz.decision with input as req(["exact", "default"], "claude-sonnet-4-5") with data.model_access as access
	d.allow
}

test_unknown_group_denied if {
	d := authz.decision with input as req(["nobody"], "claude-haiku-4-5") with data.model_access as access
	not d.allow
	contains(d.reason, "allowed models: none")
}

test_no_groups_denied if {
	d := authz.decision with input as req([], "claude-haiku-4-5") with data.model_access as access
	not d.allow
}

test_model_catalogue_allowed_for_any_key if {
	i := call([], "GET", "/v1/models", "models.list", "models", {})
	d := authz.decision with input as i with data.model_access as access with data.endpoint_access as endpoints
	d.allow
}

test_messages_without_model_denied if {
	d := authz.decision with input as req(["default"], null) with data.model_access as access
	not d.allow
	contains(d.reason, "needs a model")
}

test_count_tokens_gets_the_model_check if {
	i := json.patch(req(["haiku-only"], "claude-sonnet-4-5"), [
		{"op": "replace", "path": "/request/endpoint", "value": "messages.count_tokens"},
		{"op": "replace", "path": "/request/path", "value": "/v1/messages/count_tokens"},
	])
	d := authz.decision with input as i with data.model_access as access
	not d.allow
	contains(d.reason, "claude-sonnet-4-5")
}

test_no_endpoint_denied if {
	i := call(["default"], "GET", "/v1/anything", null, null, {})
	d := authz.decision with input as i with data.model_access as access
	not d.allow
	contains(d.reason, "no endpoint the gateway knows")
}

test_empty_endpoint_denied if {
	i := call(["default"], "GET", "/v1/anything", "", "", {})
	not authz.decision.allow with input as i
}

test_endpoint_not_granted_denied_with_reason if {
	i := call(["default"], "GET", "/v1/messages/batches/msgbatch_01", "batches.get", "batches", {"batch_id": "msgbatch_01"})
	d := authz.decision with input as i with data.endpoint_access as endpoints
	not d.allow
	contains(d.reason, "ci-bot")
	contains(d.reason, "batches.get")
}

test_endpoint_granted_by_group_prefix if {
	i := call(["batch-users"], "POST", "/v1/messages/batches/msgbatch_01/cancel", "batches.cancel", "batches", {"batch_id": "msgbatch_01"})
	authz.decision.allow with input as i with data.endpoint_access as endpoints
}

test_endpoint_granted_by_exact_name_only if {
	get := call(["auditors"], "GET", "/v1/messages/batches/b1", "batches.get", "batches", {"batch_id": "b1"})
	authz.decision.allow with input as get with data.endpoint_access as endpoints
	cancel := call(["auditors"], "POST", "/v1/messages/batches/b1/cancel", "batches.cancel", "batches", {"batch_id": "b1"})
	not authz.decision.allow with input as cancel with data.endpoint_access as endpoints
}

test_no_endpoint_access_data_denies_everything if {
	not authz.decision.allow with input as req(["default"], "claude-haiku-4-5") with data.endpoint_access as {}
}

test_endpoint_grant_does_not_skip_the_model_check if {
	d := authz.decision with input as req(["haiku-only"], "claude-opus-4-1") with data.endpoint_access as endpoints
	not d.allow
}

test_shipped_data_allows_every_known_endpoint_family if {
	every e in ["models.list", "models.get", "batches.create", "batches.results", "files.upload", "files.delete"] {
		authz.decision.allow with input as call([], "GET", "/v1/x", e, "x", {})
	}
}

test_shipped_data_default_group if {
	d := authz.decision with input as req(["default"], "claude-opus-4-1")
	d.allow
}

test_shipped_data_haiku_only if {
	not authz.decision.allow with input as req(["haiku-only"], "claude-opus-4-1")
}

# -- workloads (SPIFFE) --------------------------------------------------------

wl(spiffe_id, model) := {
	"principal": {"kind": "workload", "id": spiffe_id, "name": spiffe_id, "groups": [], "spiffe_id": spiffe_id},
	"request": {
		"method": "POST", "path": "/v1/messages", "model": model,
		"endpoint": "messages.create", "kind": "messages", "params": {},
	},
}

test_batch_job_allowed_its_one_model if {
	authz.decision.allow with input as wl("spiffe://example.org/ns/batch/sa/job", "claude-haiku-4-5")
}

test_batch_job_denied_other_models_despite_its_trust_domain if {
	d := authz.decision with input as wl("spiffe://example.org/ns/batch/sa/job", "claude-sonnet-4-5")
	not d.allow
	contains(d.reason, "workload 'spiffe://example.org/ns/batch/sa/job'")
	contains(d.reason, "allowed models: claude-haiku-4-5")
}

test_other_workload_of_trust_domain_gets_domain_access if {
	authz.decision.allow with input as wl("spiffe://example.org/ns/web/sa/api", "claude-sonnet-4-5")
}

test_workload_of_unlisted_trust_domain_denied if {
	d := authz.decision with input as wl("spiffe://other.org/ns/web/sa/api", "claude-haiku-4-5")
	not d.allow
	contains(d.reason, "allowed models: none")
}

test_trust_domain_is_not_a_prefix_match if {
	not authz.decision.allow with input as wl("spiffe://example.org.evil.com/ns/x", "claude-haiku-4-5")
}

test_key_principal_does_not_get_workload_access if {
	i := {
		"principal": {
			"kind": "key", "id": "key_1", "name": "k", "groups": [],
			"spiffe_id": "spiffe://example.org/ns/batch/sa/job",
		},
		"request": {"method": "POST", "path": "/v1/messages", "model": "claude-haiku-4-5"},
	}
	not authz.decision.allow with input as i
}
