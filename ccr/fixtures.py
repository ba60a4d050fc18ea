"""Locating shared test data: the team's ../shared/fixtures when present, else the copy in tests/fixtures."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_DIRS = (REPO.parent / "shared" / "fixtures", REPO / "tests" / "fixtures")


def fixture_path(name: str) -> Path:
    for d in _DIRS:
        if (d / name).exists():
            return d / name
    raise FileNotFoundError(f"fixture {name} not found in {', '.join(map(str, _DIRS))}")


AGENT_REQUEST = "agent_request_90k.json"
