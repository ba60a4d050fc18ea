package ccr.pii_test

import data.ccr.authz

access := {"default": ["claude-*"]}

endpoints := {"*": ["messages.*"]}

settings(mode) := {"mode": mode, "kinds": ["ssn", "card", "iban"], "patterns": [{"name": "employee_id", "regex": "EMP-[0-9]{6}"}], "exempt_groups": ["compliance"]}

req(groups, model, findings) := {
	"principal": {"kind": "key", "key_id": "key_0123456789ab", "name": "ci-bot", "groups": groups},
	"request": {
		"method": "POST", "path": "/v1/messages", "model": model,
		"endpoint": "messages.create", "kind": "messages", "params": {}, "pii": findings,
	},
}

ssn_in_tool_result := [{"kind": "ssn", "location": "messages[4].content[0].content[1]"}]

decide(groups, model, findings, mode) := d if {
	d := authz.decision with input as req(groups, model, findings)
		with data.model_access as access
		with data.endpoint_access as endpoints
		with data.pii as settings(mode)
}

test_block_denies_ssn_naming_kind_and_location if {
	d := decide(["default"], "claude-sonnet-4-5", ssn_in_tool_result, "block")
	not d.allow
	d.reason == "prompt contains a US SSN (messages[4].content[0].content[1]); remove it, or ask your gateway administrator (personal data is blocked by policy)"
}

test_block_names_every_counted_finding_in_order if {
	findings := [
		{"kind": "card", "location": "system"},
		{"kind": "email", "location": "messages[0].content"},
		{"kind": "iban", "location": "messages[1].content[0].input.account"},
	]
	d := decide(["default"], "claude-sonnet-4-5", findings, "block")
	not d.allow
	contains(d.reason, "a payment card number (system), an IBAN (messages[1].content[0].input.account)")
	not contains(d.reason, "email")
}

test_kind_not_listed_is_allowed if {
	d := decide(["default"], "claude-sonnet-4-5", [{"kind": "email", "location": "system"}], "block")
	d.allow
	d.reason == "model claude-sonnet-4-5 allowed"
}

test_team_pattern_blocks if {
	d := decide(["default"], "claude-sonnet-4-5", [{"kind": "employee_id", "location": "messages[0].content"}], "block")
	not d.allow
	contains(d.reason, "a match for the pattern 'employee_id' (messages[0].content)")
}

test_no_findings_allows if {
	d := decide(["default"], "claude-sonnet-4-5", [], "block")
	d.allow
}

test_not_scanned_allows if {
	d := authz.decision with input as req(["default"], "claude-sonnet-4-5", null)
		with data.model_access as access
		with data.endpoint_access as endpoints
		with data.pii as settings("block")
	d.allow
}

test_log_mode_allows_and_names_findings if {
	d := decide(["default"], "claude-sonnet-4-5", ssn_in_tool_result, "log")
	d.allow
	d.reason == "model claude-sonnet-4-5 allowed; personal data logged: a US SSN (messages[4].content[0].content[1])"
}

test_off_mode_ignores_findings if {
	d := decide(["default"], "claude-sonnet-4-5", ssn_in_tool_result, "off")
	d.allow
	d.reason == "model claude-sonnet-4-5 allowed"
}

test_exempt_group_is_allowed_and_logged if {
	d := decide(["default", "compliance"], "claude-sonnet-4-5", ssn_in_tool_result, "block")
	d.allow
	contains(d.reason, "personal data logged: a US SSN")
}

test_model_denial_comes_first if {
	d := decide(["default"], "gpt-4o", ssn_in_tool_result, "block")
	not d.allow
	contains(d.reason, "may not use model 'gpt-4o'")
}

test_without_pii_data_nothing_applies if {
	d := authz.decision with input as req(["default"], "claude-sonnet-4-5", ssn_in_tool_result)
		with data.model_access as access
		with data.endpoint_access as endpoints
		with data.pii as null
	d.allow
}

# The shipped data.json has the rules off (mode "off": nothing is scanned); switching the mode on
# is all a team does to enforce them.
test_shipped_data_blocks_ssn_once_mode_is_block if {
	d := authz.decision with input as req(["default"], "claude-sonnet-4-5", ssn_in_tool_result)
		with data.pii.mode as "block"
	not d.allow
	contains(d.reason, "a US SSN")
}

test_shipped_data_is_off if {
	d := authz.decision with input as req(["default"], "claude-sonnet-4-5", ssn_in_tool_result)
	d.allow
}
