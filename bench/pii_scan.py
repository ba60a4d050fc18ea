"""What the prompt PII scan costs per request (extauth/pii.py), and the decision with it.

    .venv/bin/python bench/pii_scan.py [--duration 2]

Times, each for about --duration seconds (p50/p99 per call):
- scan of the 84 KB agent request (tests/fixtures/agent_request_90k.json), all kinds;
- scan of a 2 MB request: 200 messages of mixed text (some non-ASCII), tool uses and results;
- parse + scan + the compiled shipped policy with data.pii.mode = block (decide, cache missed:
  each call carries fresh findings), on the 84 KB request;
- adversarial 2 MB strings (one block each): the time of one scan, to show it stays linear.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import orjson  # noqa: E402

from extauth.bundle import build_bundle, read_bundle  # noqa: E402
from extauth.endpoints import match  # noqa: E402
from extauth.pii import Finding, scan  # noqa: E402
from extauth.policy import PolicyEngine  # noqa: E402
from extauth.principal import Principal, PrincipalKind  # noqa: E402


def timed(label: str, fn: Callable[[], object], duration: float) -> None:
    lat: list[float] = []
    end = time.perf_counter() + duration
    while time.perf_counter() < end or len(lat) < 5:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"{label:<52} n={len(lat):>6}  p50={statistics.median(lat) * 1e6:9.1f} us  p99={p99 * 1e6:9.1f} us")


def two_mb_request() -> dict:
    para = ("The quarterly report covers revenue, churn and the migration plan; see ticket 48213 and "
            "commit 9f2c1e7. Naïve café résumé — 東京 📈. ") * 90
    msgs: list[dict] = []
    i = 0
    while len(orjson.dumps(msgs)) < 2_000_000:
        msgs.append({"role": "user", "content": [{"type": "text", "text": para}, {"type": "text", "text": "ok"}]})
        msgs.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": f"t{i}", "name": "read", "input": {"path": f"/src/m{i}.py", "n": i}}]})
        msgs.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"t{i}", "content": [{"type": "text", "text": para}]}]})
        i += 1
    return {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": msgs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=2.0)
    a = ap.parse_args()
    raw = (REPO / "tests/fixtures/agent_request_90k.json").read_bytes()
    agent = orjson.loads(raw)
    big = two_mb_request()
    big_raw = orjson.dumps(big)
    print(f"84 KB fixture: {len(raw)} bytes; 2 MB request: {len(big_raw)} bytes, {len(big['messages'])} messages")
    timed("scan 84 KB agent request", lambda: scan(agent), a.duration)
    timed("parse + scan 84 KB agent request", lambda: scan(orjson.loads(raw)), a.duration)
    timed("scan 2 MB request", lambda: scan(big), a.duration)

    with tempfile.TemporaryDirectory(prefix="pii-bench") as tmp:
        src = Path(tmp) / "policies"
        shutil.copytree(REPO / "policies", src)
        data = json.loads((src / "data.json").read_text())
        data["pii"]["mode"] = "block"
        (src / "data.json").write_text(json.dumps(data))
        eng = PolicyEngine(read_bundle(build_bundle(src, Path(tmp) / "b.tar.gz", "ccr/authz/decision")),
                           "ccr/authz/decision")
        p = Principal(PrincipalKind.KEY, "key_1", "bench", ("default",), key_id="key_1")
        ep = match("POST", "/v1/messages")
        n = [0]

        def decide(body: bytes) -> None:
            found = tuple(scan(orjson.loads(body), eng.pii.patterns, eng.pii.kinds))
            n[0] += 1  # a fresh finding each call: the decision cache never answers
            found += (Finding("ssn", f"messages[{n[0]}].content"),)
            eng.decide(p, "POST", "/v1/messages", "claude-sonnet-4-5", ep, found)

        timed("parse + scan + decide (block, cache miss) 84 KB", lambda: decide(raw), a.duration)
        timed("parse + scan + decide (block, cache miss) 2 MB", lambda: decide(big_raw), a.duration)
        eng.close()

    for name, s in (("2 MB of digits", "1" * 2_000_000), ("2 MB of '1-'", "1-" * 1_000_000),
                    ("2 MB of 'a@'", "a@" * 1_000_000), ("2 MB of 'GB82 '", "GB82 " * 400_000),
                    ("2 MB of '4111 '", "4111 " * 400_000), ("2 MB of 'a.' then '@'", "a." * 1_000_000 + "@"),
                    ("2 MB of fullwidth digits + zero-width", "１\u200b" * 1_000_000)):
        doc = {"messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]}
        t0 = time.perf_counter()
        scan(doc)
        print(f"adversarial: {name:<40} {(time.perf_counter() - t0) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
