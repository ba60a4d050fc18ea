"""The models GET /v1/models can list: what the config serves, by concrete id, plus its aliases.

Listed: every models[] entry whose `match` is an exact id, the ids an entry names in `listed` (a glob
cannot be listed by itself), and every alias (config `aliases`), each as the Anthropic Models API
object. Whether a caller sees one is the policy's decision (extauth/models_api.py), not this module's.
Order: newest first (`created_at`), then by id, as the real API sorts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ccr import routing
from ccr.config import GatewayConfig

# Display names and release dates of Anthropic's published models (the Models API's own fields); an id
# not here is shown with its id as the name and the epoch as its date.
KNOWN: dict[str, tuple[str, str]] = {
    "claude-fable-5": ("Claude Fable 5", "2026-06-09T00:00:00Z"),
    "claude-opus-4-5-20251101": ("Claude Opus 4.5", "2025-11-24T00:00:00Z"),
    "claude-haiku-4-5-20251001": ("Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
    "claude-sonnet-4-5-20250929": ("Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    "claude-opus-4-1-20250805": ("Claude Opus 4.1", "2025-08-05T00:00:00Z"),
    "claude-opus-4-20250514": ("Claude Opus 4", "2025-05-22T00:00:00Z"),
    "claude-sonnet-4-20250514": ("Claude Sonnet 4", "2025-05-22T00:00:00Z"),
    "claude-3-7-sonnet-20250219": ("Claude Sonnet 3.7", "2025-02-24T00:00:00Z"),
    "claude-3-5-haiku-20241022": ("Claude Haiku 3.5", "2024-10-22T00:00:00Z"),
    "claude-3-haiku-20240307": ("Claude Haiku 3", "2024-03-07T00:00:00Z"),
}
EPOCH = "1970-01-01T00:00:00Z"


@dataclass(frozen=True)
class Listed:
    id: str  # what the client names (an alias, or the model itself)
    served: str  # the concrete model it resolves to
    model_index: int
    display_name: str
    created_at: str

    def api_object(self) -> dict[str, str]:
        return {"type": "model", "id": self.id, "display_name": self.display_name, "created_at": self.created_at}


def _describe(model_id: str, served: str) -> tuple[str, str]:
    name, created = KNOWN.get(served, (served, EPOCH))
    return (name if model_id == served else f"{name} ({model_id})"), created


def catalog(config: GatewayConfig) -> list[Listed]:
    ids: list[str] = []
    for m in config.models:
        ids += ([] if m.is_glob else [m.match]) + m.listed
    ids += list(config.aliases)
    out: dict[str, Listed] = {}
    for i in ids:
        r = routing.resolve(config, i)
        if r is None or i in out:
            continue
        # An id an earlier, broader entry captures is listed as that entry serves it (first match wins).
        name, created = _describe(i, r.served)
        out[i] = Listed(i, r.served, r.model_index, name, created)
    return sorted(out.values(), key=lambda x: (_neg(x.created_at), x.id))


def _neg(ts: str) -> tuple[int, ...]:
    # Newest first: ISO-8601 in UTC sorts as text; negate its code points.
    return tuple(-ord(c) for c in ts)


@dataclass(frozen=True)
class Page:
    data: list[Listed]
    has_more: bool

    def api_object(self) -> dict[str, object]:
        d = [x.api_object() for x in self.data]
        return {"data": d, "has_more": self.has_more, "first_id": d[0]["id"] if d else None,
                "last_id": d[-1]["id"] if d else None}


def page(items: list[Listed], limit: int, after_id: str | None, before_id: str | None) -> Page:
    """The Models API's cursor pagination over `items` (in list order). A cursor naming no listed id
    gives an empty page (a model the caller may not see is not a cursor it can hold)."""
    ids = [x.id for x in items]
    lo, hi = 0, len(items)
    if after_id is not None:
        lo = ids.index(after_id) + 1 if after_id in ids else len(ids)
    if before_id is not None:
        hi = ids.index(before_id) if before_id in ids else 0
    window = items[lo:hi]
    if before_id is not None and after_id is None:  # the page just before the cursor
        return Page(window[-limit:], len(window) > limit)
    return Page(window[:limit], len(window) > limit)
