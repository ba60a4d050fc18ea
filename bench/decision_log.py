"""What the decision log costs per Check, split into its two halves.

    .venv/bin/python bench/decision_log.py [--dsn postgresql://...] [-n 20000]

- hot path: what Authorizer.check adds per request (the id, the queued tuple, the per-request
  copy of a cached CheckResponse with the id in its metadata), timed in isolation;
- background: the writer's CPU per decision (input digest, row, COPY into PostgreSQL),
  spent on the same event loop but outside any request's latency.

Without --dsn an embedded PostgreSQL is started in a temp dir and stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import database  # noqa: E402
from envoy.service.auth.v3 import attribute_context_pb2 as ac  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2 as pb  # noqa: E402

from ccr.config import parse_config  # noqa: E402
from ccr.contract import AUTHZ_DECISION_ID  # noqa: E402
from extauth.decisions import DecisionLog  # noqa: E402
from extauth.endpoints import match  # noqa: E402
from extauth.identity import Identity  # noqa: E402
from extauth.principal import Principal, PrincipalKind  # noqa: E402
from extauth.server import Authorizer, _Seen  # noqa: E402

CONFIG = {"version": 1, "providers": [{"name": "anthropic"}],
          "models": [{"match": "claude-*", "provider": "anthropic"}]}


def per_call_us(fn, n: int) -> float:
    return timeit.timeit(fn, number=n) / n * 1e6


def hot_path(n: int) -> None:
    log = DecisionLog(None, queue_size=n * 10, batch_rows=n * 10)
    auth = Authorizer(parse_config(CONFIG), Identity(None), None, decisions=log)  # type: ignore[arg-type]
    principal = Principal(PrincipalKind.KEY, "k_0123456789", "svc", ("default",), key_id="k_0123456789")
    req = pb.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(
        http=ac.AttributeContext.HttpRequest(method="POST", path="/v1/messages",
                                             headers={"x-request-id": "0b6c5a6e-7f7d-4b1e-9d1e-3c1f4f0b2a11"}))))
    seen = _Seen()
    seen.principal, seen.endpoint, seen.path, seen.model, seen.eval_ns = (
        principal, match("POST", "/v1/messages"), "/v1/messages", "claude-sonnet-4-5", 1000)
    cached = auth._ok(principal, "claude-sonnet-4-5", "anthropic", "provider_anthropic", (), "messages.create")

    def copy_with_id() -> None:
        own = pb.CheckResponse()
        own.CopyFrom(cached)
        own.dynamic_metadata.fields[AUTHZ_DECISION_ID].string_value = "dec_0123456789ab00000001"

    parts = {
        "_Seen()": per_call_us(_Seen, n),
        "_record (id + queued tuple)": per_call_us(lambda: auth._record(req, seen, True, 200, ""), n),
        "copy cached response + id": per_call_us(copy_with_id, n),
        "2x perf_counter_ns (eval time)": per_call_us(lambda: (time.perf_counter_ns(), time.perf_counter_ns()), n),
    }
    for k, v in parts.items():
        print(f"  {k:<34} {v:6.2f} us")
    print(f"hot path per Check (sum)             {sum(parts.values()):6.2f} us")


async def background(dsn: str, n: int) -> None:
    log = DecisionLog(dsn, queue_size=n, batch_rows=n)
    principal = Principal(PrincipalKind.KEY, "k_0123456789", "svc", ("default",), key_id="k_0123456789")
    ep = match("POST", "/v1/messages")
    for _ in range(2):
        for i in range(n):
            log.record(log.new_id(), f"rid-{i}", "full", principal, "POST", "/v1/messages", "claude-sonnet-4-5", ep,
                       None, True, 200, "", 1000)
        t0 = time.process_time()
        written = await log.flush()
        cpu = time.process_time() - t0
        assert written == n
    print(f"background per decision (CPU, COPY) {cpu / n * 1e6:6.2f} us  ({n} rows per batch)")
    await log.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", help="PostgreSQL DSN with the ccr schema (default: start an embedded one)")
    ap.add_argument("-n", type=int, default=20000)
    args = ap.parse_args()
    n = max(100, min(args.n, 1_000_000))
    hot_path(n)
    with tempfile.TemporaryDirectory(prefix="ccr-bench-") as tmp, database(Path(tmp), args.dsn) as dsn:
        asyncio.run(background(dsn, n))


if __name__ == "__main__":
    main()
