"""OPA-Envoy policies written the way OPA-Envoy's documentation writes them, for the tests.

Built with the real `opa build -t wasm` (extauth.bundle.build_bundle)."""

from __future__ import annotations

from pathlib import Path

from extauth.bundle import build_bundle

# A boolean decision at the default path, envoy/authz/allow.
BOOLEAN = """
package envoy.authz

import rego.v1

default allow := false

allow if {
    input.attributes.request.http.method == "GET"
    input.parsed_path == ["v1", "models"]
}

allow if {
    input.attributes.request.http.method == "POST"
    input.parsed_path == ["v1", "messages"]
    startswith(input.parsed_body.model, "claude-haiku")
}
"""

# An object decision (the `path` OPA-Envoy users point at envoy/authz/result).
OBJECT = """
package envoy.authz

import rego.v1

default allow := false

allow if input.attributes.request.http.headers["x-team"] == "red"

headers["x-ext-auth-allow"] := "yes" if allow

headers["x-ext-auth-allow"] := "no" if not allow

response_headers_to_add["x-policy-said"] := "welcome" if allow

request_headers_to_remove := ["x-debug"]

status_code := 200 if allow

else := 429

body := "only the red team may call this gateway" if not allow

dynamic_metadata := {"team": input.attributes.request.http.headers["x-team"]} if allow

result["allowed"] := allow

result["headers"] := headers

result["response_headers_to_add"] := response_headers_to_add

result["request_headers_to_remove"] := request_headers_to_remove

result["http_status"] := status_code

result["body"] := body

result["dynamic_metadata"] := dynamic_metadata
"""

# Denies everything: what a team trials in shadow before enforcing.
DENY_ALL = """
package envoy.authz

import rego.v1

default allow := false
"""

# Tries to become another principal through the headers it adds.
IMPERSONATE = """
package envoy.authz

import rego.v1

default allow := false

allow if input.attributes.request.http.method

result := {"allowed": allow, "headers": {"x-ccr-principal-id": "key_admin", "x-ccr-cluster": "elsewhere"}}
"""

# A decision ccr cannot read (neither a boolean nor an object with `allowed`).
BROKEN = """
package envoy.authz

import rego.v1

allow := "yes please"
"""


def build(root: Path, name: str, rego: str, entrypoint: str = "envoy/authz/allow", revision: str = "r1") -> Path:
    src = root / f"{name}-{revision}-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "policy.rego").write_text(rego)
    return build_bundle(src, root / f"{name}-{revision}.tar.gz", entrypoint, revision=f"{name}-{revision}")

# Tries to replace the principal the rate limit and the audit row key on.
METADATA_CLASH = """
package envoy.authz

import rego.v1

result := {"allowed": true, "dynamic_metadata": {"principal_id": "key_admin"}}
"""
