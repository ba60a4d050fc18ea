# Tiers: which class of models a principal may use, and its ceilings (max_tokens, request size,
# thinking budget, tools). A principal's tier comes from data, never from the request:
#   data.tier_groups     group -> tier              ({"contractors": "contractor"})
#   data.workload_tiers  SPIFFE ID -> tier
#   input.principal.claims.tier, when the gateway's config passes that IdP claim and it names a tier
# When several apply, the most restrictive wins: the first of them in data.tier_order. Otherwise
# data.default_tier ("standard" when unset).
#
#   data.tiers[tier] = {
#     "models": ["claude-haiku-*"],     # optional: only these models (on top of the group grants)
#     "max_tokens": 8192,                # optional ceilings; a request above one is denied
#     "max_request_bytes": 1048576,      #   (413 for the size, 403 for the others)
#     "max_thinking_budget": 4096,
#     "max_tools": 16,
#     "tools": ["read_*", "grep"]        # optional: only tools whose names match (exact or prefix*)
#   }
# WASM-native builtins only (format_int, concat, startswith, ...).
package ccr.tiers

default tier := "standard"

tier := data.tier_order[first] if {
	first := min({i |
		some i, t in data.tier_order
		t in candidates
	})
} else := data.default_tier if is_string(data.default_tier)

candidates contains t if {
	some g in input.principal.groups
	t := data.tier_groups[g]
}

candidates contains t if {
	t := data.workload_tiers[input.principal.spiffe_id]
}

candidates contains t if {
	t := input.principal.claims.tier
	data.tiers[t]
}

settings := data.tiers[tier] if data.tiers[tier]

else := {}

# -- models ---------------------------------------------------------------------

default model_permitted := true

model_permitted := false if {
	is_array(settings.models)
	not tier_model_matches
}

tier_model_matches if {
	some pattern in settings.models
	matches(pattern, input.request.model)
}

model_denial := concat("", [
	"tier '", tier, "' may use only models ", concat(", ", settings.models), ", not '", input.request.model,
	"'. Use one of those, or ask your gateway administrator for another tier.",
])

# -- ceilings -------------------------------------------------------------------

# The first ceiling the request exceeds, as a denial {allow, status, reason}; undefined when none.
denial := deny(413, concat("", [
	"request is ", format_int(input.request.size, 10), " bytes, above the ceiling of ",
	format_int(settings.max_request_bytes, 10), " bytes for tier '", tier, "'",
])) if {
	is_number(settings.max_request_bytes)
	input.request.size > settings.max_request_bytes
} else := deny(403, concat("", [
	"max_tokens ", format_int(input.request.max_tokens, 10), " is above the ceiling of ",
	format_int(settings.max_tokens, 10), " for tier '", tier, "'; lower max_tokens",
])) if {
	is_number(settings.max_tokens)
	is_number(input.request.max_tokens)
	input.request.max_tokens > settings.max_tokens
} else := deny(403, concat("", [
	"thinking budget ", format_int(input.request.thinking_budget, 10), " is above the ceiling of ",
	format_int(settings.max_thinking_budget, 10), " for tier '", tier, "'; lower thinking.budget_tokens",
	thinking_note,
])) if {
	is_number(settings.max_thinking_budget)
	is_number(input.request.thinking_budget)
	input.request.thinking_budget > settings.max_thinking_budget
} else := deny(403, concat("", [
	"request declares ", format_int(input.request.tool_count, 10), " tools, above the ceiling of ",
	format_int(settings.max_tools, 10), " for tier '", tier, "'",
])) if {
	is_number(settings.max_tools)
	input.request.tool_count > settings.max_tools
} else := deny(403, concat("", [
	"tool '", first_refused_tool, "' is not allowed for tier '", tier, "' (allowed: ",
	concat(", ", settings.tools), ")",
])) if {
	first_refused_tool
}

# Thinking without a budget of its own (adaptive) may use all of max_tokens: extauth passes that as its budget.
thinking_note := " (adaptive thinking without budget_tokens may use all of max_tokens)" if {
	input.request.thinking in {"adaptive", "between_tools"}
} else := ""

deny(status, reason) := {"allow": false, "status": status, "reason": concat("", [
	reason, ". Ask your gateway administrator if you need more.",
])}

refused_tools := [name |
	is_array(settings.tools)
	some name in input.request.tools
	not tool_allowed(name)
]

first_refused_tool := refused_tools[0]

tool_allowed(name) if {
	some pattern in settings.tools
	matches(pattern, name)
}

matches(pattern, value) if pattern == value

matches(pattern, value) if {
	endswith(pattern, "*")
	startswith(value, trim_suffix(pattern, "*"))
}
