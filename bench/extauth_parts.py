"""Where one in-process ext_authz Check of the agent request spends its CPU, step by step.

    .venv/bin/python bench/extauth_parts.py [-n 2000]

The Authorizer as `ccr up` builds it from ccr.example.yaml (the shipped policies, spend on with no
budget, the decision log into an embedded PostgreSQL), an API key; each step of the handler is
wrapped to add up its process CPU (time.process_time_ns), so the figures hold on a busy machine.
The steps overlap ("check" holds all of them; "_objects" holds "mentions_file").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import inspect
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import check_request, database  # noqa: E402

import extauth.identity as identity_mod  # noqa: E402
import extauth.server as server_mod  # noqa: E402
from ccr.config import load_config  # noqa: E402
from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from extauth.bundle import build_bundle  # noqa: E402
from extauth.decisions import DecisionLog  # noqa: E402
from extauth.keys import KeyStore, create_key  # noqa: E402
from extauth.policy import PolicyEngine  # noqa: E402
from extauth.spend import BudgetSubjects, WorstCase  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
spent: collections.Counter[str] = collections.Counter()


def timed(owner: object, name: str) -> None:
    f = getattr(owner, name)
    if inspect.iscoroutinefunction(f):
        @functools.wraps(f)
        async def g(*a, **k):  # type: ignore[no-untyped-def]
            t = time.process_time_ns()
            try:
                return await f(*a, **k)
            finally:
                spent[name] += time.process_time_ns() - t
    else:
        @functools.wraps(f)
        def g(*a, **k):  # type: ignore[no-untyped-def]
            t = time.process_time_ns()
            try:
                return f(*a, **k)
            finally:
                spent[name] += time.process_time_ns() - t
    setattr(owner, name, g)


for step in ("split_check", "endpoint_or_deny", "json_object", "request_facts_of", "mentions_file", "_headers"):
    timed(server_mod, step)
for step in ("check", "_record", "_objects", "_model_cluster"):
    timed(server_mod.Authorizer, step)
timed(WorstCase, "facts")
timed(PolicyEngine, "decide")
timed(identity_mod.Identity, "authenticate")


async def run(tmp: Path, dsn: str, n: int) -> None:
    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    cfg["policy"]["dir"] = str(REPO / "policies")
    (tmp / "ccr.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(tmp / "ccr.yaml")
    _, key = create_key(dsn, "bench", ["default"], rpm=10_000_000)
    keys = KeyStore(dsn)
    await keys.start()
    build_bundle(REPO / "policies", tmp / "policy.tar.gz", config.policy.entrypoint)
    policy = PolicyEngine.load(tmp / "policy.tar.gz", config.policy.entrypoint)
    decisions = DecisionLog(dsn)
    await decisions.start()
    auth = server_mod.Authorizer(config, keys, policy, decisions=decisions)
    subjects = BudgetSubjects(dsn, 1.0)
    await subjects.load_once()
    assert auth.worst_case is not None
    auth.worst_case.subjects = subjects
    raw = check_request(fixture_path(AGENT_REQUEST).read_bytes(), {"x-api-key": key, "x-request-id": "r"}
                        ).SerializeToString()
    try:
        for _ in range(50):
            assert (await auth.check_serialized(raw)).status.code == 0
        for _ in range(2):
            spent.clear()
            t0 = time.process_time_ns()
            for i in range(n):
                await auth.check_serialized(raw)
                if i % 200 == 0:
                    await asyncio.sleep(0)  # let the decision log's writer run
            total = time.process_time_ns() - t0
            print(f"{total / n / 1000:.1f} us CPU per Check: "
                  + ", ".join(f"{k} {v / n / 1000:.1f}" for k, v in spent.most_common()), flush=True)
    finally:
        await decisions.close()
        await subjects.close()
        await keys.close()
        policy.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ccr-bench-") as d, database(Path(d), None) as dsn:
        asyncio.run(run(Path(d), dsn, max(1, min(args.n, 100_000))))


if __name__ == "__main__":
    main()
