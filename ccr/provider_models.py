"""Model ids across providers: one canonical (Anthropic API) id, each provider's spelling of it.

The gateway decides and routes on the Anthropic API's id ("claude-sonnet-4-5-20250929"): policy's
`model_access`, the config's `models` and the audit row all see that. A Bedrock client's path id
("us.anthropic.claude-sonnet-4-5-20250929-v1:0") is brought to it first; a provider that names
models its own way (Bedrock, Vertex) gets its spelling when the adapter builds the upstream URL.
A provider's `model_ids` map overrides the derived spelling (inference profiles, pinned versions).
"""

from __future__ import annotations

import re

# Bedrock: optional geography prefix of a cross-region inference profile, the vendor, the id,
# then the version suffix ("-v1:0", "-v2").
_BEDROCK = re.compile(r"^(?:(?:us|eu|apac|jp|au|ca|us-gov|global)\.)?anthropic\.(?P<id>[a-z0-9-]+?)"
                      r"(?:-v\d+(?::\d+)?)?$")
_DATED = re.compile(r"^(?P<base>.+)-(?P<date>\d{8})$")


def from_bedrock(model_id: str) -> str:
    """The Anthropic API id of a Bedrock model id; an id that is not Anthropic-on-Bedrock is kept
    as it is (the config's `models` then decide whether anything serves it)."""
    m = _BEDROCK.fullmatch(model_id)
    return m.group("id") if m else model_id


def to_bedrock(model: str, overrides: dict[str, str] | None = None) -> str:
    if overrides and model in overrides:
        return overrides[model]
    return f"anthropic.{model}-v1:0"


def to_vertex(model: str, overrides: dict[str, str] | None = None) -> str:
    """Vertex writes a dated id with '@' before its date ("claude-sonnet-4-5@20250929")."""
    if overrides and model in overrides:
        return overrides[model]
    m = _DATED.fullmatch(model)
    return f"{m.group('base')}@{m.group('date')}" if m else model
