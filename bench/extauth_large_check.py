"""One ext_authz Check of a 20 MB Messages request, in-process: peak traced allocation and time.

    .venv/bin/python bench/extauth_large_check.py [--mib 20] [--whole] [--dsn postgresql://...]

For a streamed request with one huge text block and one with a huge base64 image, prints the
tracemalloc peak beyond what was live before the Check (the received message itself is not
counted: it is the one copy gRPC hands over) and the best of 5 times. `--whole` does what extauth
did before: the whole message parsed and the whole body given to orjson (thresholds off).
Without --dsn an embedded PostgreSQL is started in a temp dir and stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import check_request, database  # noqa: E402

from ccr.config import parse_config  # noqa: E402
from extauth import lean_json, wire  # noqa: E402
from extauth.bundle import build_bundle  # noqa: E402
from extauth.keys import KeyStore, create_key  # noqa: E402
from extauth.policy import PolicyEngine  # noqa: E402
from extauth.server import Authorizer  # noqa: E402

MIB = 1024 * 1024
CONFIG = {"version": 1, "providers": [{"name": "anthropic"}],
          "models": [{"match": "claude-*", "provider": "anthropic"}]}


def bodies(size: int) -> dict[str, bytes]:
    def req(content: list[dict]) -> bytes:
        return orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16, "stream": True,
                             "messages": [{"role": "user", "content": content}]})
    text = ("All work and no play makes Jack a dull boy.\n" * (size // 44 + 1))[:size]
    data = base64.b64encode(bytes(range(256)) * (size * 3 // 4 // 256)).decode()
    return {"text": req([{"type": "text", "text": text}]),
            "image": req([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}])}


async def measure(dsn: str, bundle: Path, size: int) -> None:
    _, key = create_key(dsn, "bench-large")
    keys = KeyStore(dsn)
    await keys.start()
    auth = Authorizer(parse_config(CONFIG), keys, PolicyEngine.load(bundle, "ccr/authz/decision"))
    headers = {"x-api-key": key}
    try:
        warm = check_request(orjson.dumps({"model": "claude-sonnet-4-5", "messages": []}), headers)
        assert (await auth.check(warm)).status.code == 0
        for kind, body in bodies(size).items():
            raw = check_request(body, headers).SerializeToString()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            resp = await auth.check_serialized(raw)
            peak = tracemalloc.get_traced_memory()[1] - before
            tracemalloc.stop()
            assert resp.status.code == 0, resp
            times = []
            for _ in range(5):
                t = time.perf_counter()
                await auth.check_serialized(raw)
                times.append(time.perf_counter() - t)
            print(f"{kind:<6} body {len(body) / MIB:5.1f} MiB  peak traced {peak / MIB:7.1f} MiB  "
                  f"({peak / len(body):5.2f} x body)  {min(times) * 1000:6.1f} ms per Check")
    finally:
        await keys.close()
        auth.policy.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=20.0)
    ap.add_argument("--whole", action="store_true", help="parse message and body whole (the old way)")
    ap.add_argument("--dsn", help="PostgreSQL DSN with the ccr schema (default: start an embedded one)")
    args = ap.parse_args()
    if args.whole:
        wire.SPLIT_FROM_BYTES = lean_json.SKELETON_FROM_BYTES = 1 << 62
    size = int(max(1.0, min(args.mib, 200.0)) * MIB)
    with tempfile.TemporaryDirectory(prefix="ccr-bench-") as tmp, database(Path(tmp), args.dsn) as dsn:
        bundle = build_bundle(REPO / "policies", Path(tmp) / "policy.tar.gz", "ccr/authz/decision")
        asyncio.run(measure(dsn, bundle, size))


if __name__ == "__main__":
    main()
