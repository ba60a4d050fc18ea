"""Memory under large bodies: N concurrent ~20 MB Messages requests through a whole gateway.

    .venv/bin/python bench/large_body.py [--concurrency 16] [--mib 20] [--no-stream | --stream-only]

Starts its own gateway (embedded PostgreSQL/Redis, the emulator upstream) in a temp dir, like
bench/gateway.py, then per mode (streamed, unstreamed) sends `--concurrency` requests at once, half
with one huge text block and half with one huge base64 image block, built in memory. Prints, per
server process (its worker children included), the resident set before the load and the peak
(VmHWM, /proc/PID/status) after each mode, and whether every request succeeded. VmHWM is the
lifetime peak, so the second mode's figures include the first's. Issue 6's target: every process
under 1 GiB. Exits 1 when a request failed or a process went over.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway import API_VERSION, _proc_table, gateway_config, reply_complete  # noqa: E402
from ccr.supervisor import Gateway  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
MODEL = "claude-sonnet-4-5"


def big_text_body(size: int, stream: bool) -> bytes:
    """A Messages request of about `size` bytes: one user text block."""
    text = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
    return orjson.dumps({"model": MODEL, "max_tokens": 16, "stream": stream,
                         "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]})


def big_image_body(size: int, stream: bool) -> bytes:
    """A Messages request of about `size` bytes: one base64 PNG-typed image block and a question."""
    raw = os.urandom(size * 3 // 4)
    return orjson.dumps({"model": MODEL, "max_tokens": 16, "stream": stream, "messages": [{
        "role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(raw).decode()}},
            {"type": "text", "text": "What is in this image?"}]}]})


def _tree(root: int) -> list[int]:
    """`root` and its descendants (services may run worker processes)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in _proc_table().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pids: dict[str, int], field: str) -> dict[str, tuple[int, int]]:
    """name -> (largest single process, number of processes) for `field` (VmRSS, VmHWM), in bytes."""
    out = {}
    for name, root in pids.items():
        tree = _tree(root)
        out[name] = (max(_status_kib(p, field) for p in tree) * 1024, len(tree))
    return out


async def send(session: aiohttp.ClientSession, url: str, key: str, body: bytes, stream: bool) -> tuple[bool, str]:
    headers = {"x-api-key": key, "anthropic-version": API_VERSION, "content-type": "application/json"}
    try:
        async with session.post(url, data=body, headers=headers) as r:
            data = await r.read()
            ok = reply_complete(r.status, data, stream)
            return ok, "" if ok else f"{r.status} {data[:300]!r}"
    except (TimeoutError, aiohttp.ClientError) as e:
        return False, f"{type(e).__name__}: {e}"


async def burst(url: str, key: str, bodies: list[bytes], stream: bool) -> list[tuple[bool, str]]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        return await asyncio.gather(*(send(s, f"{url}/v1/messages", key, b, stream) for b in bodies))


def table(before: dict[str, tuple[int, int]], peak: dict[str, tuple[int, int]]) -> str:
    lines = [f"  {'process':<10} {'procs':>5} {'RSS before':>11} {'peak (VmHWM)':>13}"]
    for name in peak:
        n = peak[name][1]
        flag = "  OVER 1 GiB" if peak[name][0] >= GIB else ""
        lines.append(f"  {name:<10} {n:>5} {before[name][0] / MIB:>8.0f} MB {peak[name][0] / MIB:>10.0f} MB{flag}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--mib", type=float, default=20.0, help="body size of each request in MiB")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--no-stream", action="store_true")
    g.add_argument("--stream-only", action="store_true")
    args = ap.parse_args()
    n = max(1, min(args.concurrency, 256))
    size = int(max(0.1, min(args.mib, 200)) * MIB)
    modes = [True] if args.stream_only else [False] if args.no_stream else [True, False]

    failed = False
    with tempfile.TemporaryDirectory(prefix="ccr-bench-") as d:
        tmp = Path(d)
        print("starting the gateway ...", file=sys.stderr)
        gw = Gateway(gateway_config(tmp))
        try:
            gw.start()
            assert gw.runtime is not None
            from extauth.keys import create_key

            _, key = create_key(gw.runtime.postgres_dsn, "bench", ["default"], rpm=10_000_000)
            pids = {c.name: c.pid for c in gw.children}
            before = memory(pids, "VmRSS")
            for stream in modes:
                bodies = [(big_text_body if i % 2 == 0 else big_image_body)(size, stream) for i in range(n)]
                t = time.monotonic()
                results = asyncio.run(burst(gw.url, key, bodies, stream))
                wall = time.monotonic() - t
                ok = sum(1 for good, _ in results if good)
                peak = memory(pids, "VmHWM")
                mode = "streamed" if stream else "unstreamed"
                print(f"{mode}: {n} concurrent requests of {len(bodies[0]) / MIB:.1f} MiB (text) / "
                      f"{len(bodies[1 % n]) / MIB:.1f} MiB (image): {ok}/{n} succeeded in {wall:.1f}s")
                for good, why in results:
                    if not good:
                        print(f"  failed: {why}")
                print(table(before, peak))
                failed |= ok != n or any(v >= GIB for v, _ in peak.values())
                del bodies, results
        finally:
            gw.stop()
    print("shared, busy machine: figures are indicative", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
