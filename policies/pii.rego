# Prompt PII rules: what to do with the personal data extauth found in a Messages request.
#
# extauth scans the request's text once (extauth/pii.py) when data.pii.mode is "block" or "log",
# and passes input.request.pii = [{"kind", "location"}] (kinds: ssn, card, iban, email, or the
# name of a pattern in data.pii.patterns; never the matched value). Here:
#   block: a finding of a kind in data.pii.kinds (or of a team pattern) denies the request,
#          unless the principal is in one of data.pii.exempt_groups (then it is logged);
#   log:   the request is allowed and the findings are named in the decision's reason;
#   off:   nothing is scanned, nothing here applies.
# WASM-native builtins only (concat, object.get), like authz.rego.
package ccr.authz

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
