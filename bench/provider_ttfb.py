"""Streaming time to first byte on each provider path, against the Anthropic passthrough.

    .venv/bin/python bench/provider_ttfb.py [--duration 2]

A whole gateway (real Envoy, extauth, ratelimit, the adapter) with the Anthropic emulator and
the Bedrock, Vertex and OpenAI-compatible emulators. For each path, streamed requests one at a
time (round-robin over the paths, so they share the machine's noise) measure the time from
sending the request to the first byte of the reply body, through the gateway and straight to
that path's emulator. "added" is the gateway's share (gateway - direct); the last column is what
the path adds over the Anthropic passthrough's share: the adapter hop, translation and, for
Bedrock and Vertex, signing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router.adapter.translators.bedrock import AwsKeys, bedrock_path, sign  # noqa: E402
from router.adapter.translators.vertex import TokenSource  # noqa: E402
from tests.harness import running_gateway  # noqa: E402
from tests.provider_emulators import (  # noqa: E402
    AWS_KEY_ID,
    AWS_SECRET,
    OPENAI_KEY,
    PROJECT,
    REGION,
    Emulators,
)

HELLO = [{"role": "user", "content": "hello"}]
Send = Callable[[httpx.Client], float]


def ttfb(c: httpx.Client, url: str, body: bytes, headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    with c.stream("POST", url, content=body, headers={"accept-encoding": "identity", **headers}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.read()[:300]!r}")
        first = None
        for _ in r.iter_raw():
            if first is None:
                first = time.perf_counter() - t0
    assert first is not None, f"{url}: empty reply"
    return first


def paths(gw_url: str, key: str, anthropic_url: str, anthropic_key: str, emus: object,
          routing: bool = False) -> dict[str, tuple[Send, Send]]:
    msg = {"max_tokens": 64, "messages": HELLO, "stream": True}
    ah = {"anthropic-version": "2023-06-01", "content-type": "application/json", "accept-encoding": "identity"}
    gh = {**ah, "x-api-key": key}

    def gw_messages(model: str) -> Send:
        body = orjson.dumps({**msg, "model": model})
        return lambda c: ttfb(c, f"{gw_url}/v1/messages", body, gh)

    def direct_anthropic(c: httpx.Client) -> float:
        return ttfb(c, f"{anthropic_url}/v1/messages", orjson.dumps({**msg, "model": "claude-sonnet-4-6"}),
                    {**ah, "x-api-key": anthropic_key})

    bedrock_url = emus.bedrock_url  # type: ignore[attr-defined]
    host = bedrock_url.split("//", 1)[1]

    def direct_bedrock(c: httpx.Client) -> float:
        path = bedrock_path("anthropic.claude-bedrock-sonnet-4-5-v1:0", True)
        body = orjson.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "messages": HELLO})
        h = {"content-type": "application/json", "accept": "application/vnd.amazon.eventstream"}
        h |= sign(AwsKeys(AWS_KEY_ID, AWS_SECRET), "us-east-1", host, path, body, h)
        return ttfb(c, bedrock_url + path, body, h)

    vertex_url = emus.vertex_url  # type: ignore[attr-defined]
    import asyncio

    token = asyncio.run(TokenSource.from_file(str(emus.service_account_file)).token())  # type: ignore[attr-defined]

    def direct_vertex(c: httpx.Client) -> float:
        path = (f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/models/"
                "claude-vertex-sonnet-4-5:streamRawPredict")
        body = orjson.dumps({"anthropic_version": "vertex-2023-10-16", "max_tokens": 64, "messages": HELLO,
                             "stream": True})
        return ttfb(c, vertex_url + path, body, {"authorization": f"Bearer {token}",
                                                 "content-type": "application/json"})

    oss_url = emus.openai_url  # type: ignore[attr-defined]

    def direct_oss(c: httpx.Client) -> float:
        body = orjson.dumps({"model": "qwen/Qwen3-8B", "max_tokens": 64, "messages": HELLO, "stream": True,
                             "stream_options": {"include_usage": True}})
        return ttfb(c, f"{oss_url}/v1/chat/completions", body, {"authorization": f"Bearer {OPENAI_KEY}",
                                                                "content-type": "application/json"})

    def gw_chat(c: httpx.Client) -> float:
        body = orjson.dumps({"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": HELLO, "stream": True})
        return ttfb(c, f"{gw_url}/v1/chat/completions", body, {"x-api-key": key, "content-type": "application/json"})

    def gw_bedrock_client(c: httpx.Client) -> float:
        body = orjson.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "messages": HELLO})
        return ttfb(c, f"{gw_url}/model/anthropic.claude-bedrock-sonnet-4-5-v1:0/invoke-with-response-stream",
                    body, {"x-api-key": key, "content-type": "application/json"})

    def gw_failover(c: httpx.Client) -> float:
        # The built-in emulator answers this attempt 529 (x-emulator-fault); the chain's Bedrock target the retry.
        body = orjson.dumps({**msg, "model": "claude-failover-1"})
        return ttfb(c, f"{gw_url}/v1/messages", body, {**gh, "x-emulator-fault": "529"})

    extra = {
        "alias -> anthropic (alias.lua rewrite)": (gw_messages("bench-alias"), direct_anthropic),
        "anthropic 529 -> bedrock (failover)": (gw_failover, direct_bedrock),
    } if routing else {}
    return {
        "anthropic passthrough (Lua meter)": (gw_messages("claude-sonnet-4-6"), direct_anthropic),
        **extra,
        "anthropic -> bedrock": (gw_messages("claude-bedrock-sonnet-4-5"), direct_bedrock),
        "anthropic -> vertex": (gw_messages("claude-vertex-sonnet-4-5"), direct_vertex),
        "anthropic -> openai-compatible": (gw_messages("claude-oss-1"), direct_oss),
        "openai client -> anthropic": (gw_chat, direct_anthropic),
        "bedrock client -> bedrock": (gw_bedrock_client, direct_bedrock),
    }


@contextmanager
def emulators_process(tmp: Path) -> Iterator[Emulators]:
    """The provider emulators in a child process of their own (tracked by PID, stopped exactly)."""
    child = subprocess.Popen([sys.executable, "-m", "tests.provider_emulators", str(tmp)], stdout=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parent.parent, text=True)
    try:
        info = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        yield Emulators(info["bedrock_url"], info["vertex_url"], info["openai_url"], None, None, None,  # type: ignore[arg-type]
                        Path(info["service_account_file"]), None)  # type: ignore[arg-type]
    finally:
        child.terminate()
        child.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds of measured requests per path")
    ap.add_argument("--routing", action="store_true",
                    help="also an alias (config `aliases`: every Messages cluster then runs router/alias.lua) and a "
                         "failover from the Anthropic API (529) to Bedrock")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ccr-ttfb-") as tmp, emulators_process(Path(tmp)) as emus:
        import os

        os.environ.update(emus.env())

        def edit(cfg: dict[str, object]) -> None:
            cfg["providers"] += emus.providers()  # type: ignore[operator]
            cfg["models"] = emus.models() + cfg["models"]  # type: ignore[operator]
            cfg["limits"] = {"requests_per_minute": 1_000_000}
            if args.routing:
                cfg["aliases"] = {"bench-alias": "claude-sonnet-4-6"}
                cfg["models"] = [{"match": "claude-failover-*", "targets": ["anthropic", "bedrock"]},  # type: ignore[operator]
                                 *cfg["models"]]  # type: ignore[misc]

        (Path(tmp) / "gw").mkdir()
        with running_gateway(Path(tmp) / "gw", edit) as gw:
            table = paths(gw.url, gw.api_key, str(gw.emulator_url), str(gw.emulator_key), emus, args.routing)
            got: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in table}
            with httpx.Client(timeout=30) as c:
                for via_gw, direct in table.values():  # warm up connections and caches
                    for _ in range(5):
                        via_gw(c)
                        direct(c)
                deadline = time.monotonic() + args.duration * len(table)
                while time.monotonic() < deadline:
                    for name, (via_gw, direct) in table.items():
                        got[name][0].append(via_gw(c))
                        got[name][1].append(direct(c))
    base = None
    print(f"{'path':<40} {'n':>5} {'gateway p50':>12} {'direct p50':>11} {'added':>8} {'vs passthrough':>15}")
    for name, (g, d) in got.items():
        gm, dm = statistics.median(g) * 1e3, statistics.median(d) * 1e3
        added = gm - dm
        base = added if base is None else base
        print(f"{name:<40} {len(g):>5} {gm:>9.2f} ms {dm:>8.2f} ms {added:>5.2f} ms {added - base:>+12.2f} ms")


if __name__ == "__main__":
    main()
