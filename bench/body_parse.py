"""How long extauth takes to read a request body (extauth/lean_json.py): jiter with its repeated-key check against
orjson, which read bodies before.

    .venv/bin/python bench/body_parse.py [--rounds 9] [-n 2000]

For the 84 KB agent request and a 4 MB body of long strings (read as a skeleton): orjson, `loads_one_reading`
(jiter, refusing a key given twice in one object) and `loads_lazy` (what extauth calls). Minimum over rounds,
µs per body. In a hot loop; in the service, with cold caches, each costs more (docs/large-bodies.md).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from extauth import lean_json  # noqa: E402


def best(f: Callable[[], object], n: int, rounds: int) -> float:
    return min(timeit.repeat(f, number=n, repeat=rounds)) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("-n", type=int, default=2000, help="parses per round for the small body (a tenth for the large)")
    a = ap.parse_args()
    agent = fixture_path(AGENT_REQUEST).read_bytes()
    large = orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x" * 64_000 + str(i)} for i in range(64)]}]})
    for name, body, n in (("agent request", agent, a.n), ("long strings", large, max(1, a.n // 100))):
        view = memoryview(body)
        print(f"{name} ({len(body) / 1024:.0f} KB): orjson {best(lambda v=view: orjson.loads(v), n, a.rounds):.1f} µs, "
              f"one reading {best(lambda v=view: lean_json.loads_one_reading(v), n, a.rounds):.1f} µs, "
              f"loads_lazy {best(lambda v=view: lean_json.loads_lazy(v), n, a.rounds):.1f} µs")


if __name__ == "__main__":
    main()
