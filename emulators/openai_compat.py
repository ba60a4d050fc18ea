"""OpenAI-compatible Chat Completions emulator: what vLLM, TGI or SGLang serve.

POST /v1/chat/completions with an optional bearer key: text replies, tool calls (when tools
are given and the last message is not a tool result, or a tool is forced), streaming chunks
ending in `data: [DONE]`, and usage (a final chunk with empty choices when
stream_options.include_usage is true, as vLLM does). No SSE keep-alives.
Generation reuses emulators/anthropic.py's rules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import signal
import time
from typing import Any

import orjson
from aiohttp import web

from emulators.anthropic import CHARS_PER_TOKEN, TOKENS_PER_DELTA, _chunk, _rand_id, generate


def oa_error(status: int, message: str, etype: str = "BadRequestError") -> web.Response:
    return web.Response(status=status, content_type="application/json", body=orjson.dumps(
        {"object": "error", "message": message, "type": etype, "param": None, "code": status}))


def _as_anthropic(doc: dict[str, Any]) -> dict[str, Any]:
    """Enough of an Anthropic body for generate(): the last user text, tools, tool choice, max_tokens."""
    msgs = doc["messages"]
    last = msgs[-1]
    text = last.get("content") if isinstance(last.get("content"), str) else "".join(
        p.get("text", "") for p in last.get("content") or () if isinstance(p, dict))
    body: dict[str, Any] = {"max_tokens": int(doc.get("max_tokens") or doc.get("max_completion_tokens") or 256),
                            "messages": [{"role": "user", "content": text or "the tool results"}]}
    tools = [{"name": t["function"]["name"], "input_schema": t["function"].get("parameters") or {}}
             for t in doc.get("tools") or () if t.get("type") == "function"]
    tc = doc.get("tool_choice")
    if tools and last.get("role") != "tool" and tc != "none":
        body["tools"] = tools
        if isinstance(tc, dict):
            body["tool_choice"] = {"type": "tool", "name": tc["function"]["name"]}
        else:
            body["tool_choice"] = {"type": "any"}
    if doc.get("stop"):
        body["stop_sequences"] = [doc["stop"]] if isinstance(doc["stop"], str) else doc["stop"]
    return body


class OpenAICompatEmulator:
    def __init__(self, api_key: str | None = None, output_tokens: int = 24, tokens_per_second: float = 0.0) -> None:
        self.api_key = api_key
        self.output_tokens = output_tokens
        self.tps = tokens_per_second
        self.records: list[dict[str, Any]] = []
        # x-emulator-hold: NAME stops a stream after its first delta until POST /_emulator/release/NAME:
        # a server thinking silently (no keep-alives), for as long as a test needs.
        self._holds: dict[str, asyncio.Event] = {}
        self.in_flight = 0  # requests being answered: the queue depth a worker reports when it registers
        self.healthy = True  # GET /health answers 503 when false (POST /_emulator/health/fail|ok)

    def _hold(self, name: str) -> asyncio.Event:
        return self._holds.setdefault(name, asyncio.Event())

    async def release(self, request: web.Request) -> web.Response:
        self._hold(request.match_info["name"]).set()
        return web.json_response({"released": request.match_info["name"]})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.counted)
        app.router.add_get("/health", self.health)
        app.router.add_post("/_emulator/health/{state}", self.set_health)
        app.router.add_post("/_emulator/release/{name}", self.release)
        app.router.add_get("/_emulator/requests", lambda r: web.json_response(self.records))
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": self.healthy}, status=200 if self.healthy else 503)

    async def set_health(self, request: web.Request) -> web.Response:
        self.healthy = request.match_info["state"] == "ok"
        return web.json_response({"ok": self.healthy})

    async def counted(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await self.chat(request)
        finally:
            self.in_flight -= 1

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        rec: dict[str, Any] = {"path": request.path, "headers": dict(request.headers), "body": raw.decode()}
        self.records.append(rec)
        if self.api_key is not None:
            auth = request.headers.get("authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                return oa_error(401, "Unauthorized", "AuthenticationError")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return oa_error(400, "invalid JSON body")
        if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list) or not doc["messages"]:
            return oa_error(400, "messages: a non-empty list is required")
        if not isinstance(doc.get("model"), str):
            return oa_error(400, "model: required")
        reply = generate(_as_anthropic(doc), self.output_tokens)
        prompt_tokens = max(1, len(orjson.dumps(doc["messages"])) // CHARS_PER_TOKEN)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": reply.output_tokens,
                 "total_tokens": prompt_tokens + reply.output_tokens}
        block = reply.blocks[-1]
        finish = "tool_calls" if block["type"] == "tool_use" else ("length" if reply.stop_reason == "max_tokens"
                                                                    else "stop")
        cid, created, model = _rand_id("chatcmpl-", 24), int(time.time()), doc["model"]
        if not doc.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": None}
            if block["type"] == "tool_use":
                message["tool_calls"] = [{"id": _rand_id("call_", 24), "type": "function", "function": {
                    "name": block["name"], "arguments": orjson.dumps(block["input"]).decode()}}]
            else:
                message["content"] = block["text"]
            return web.json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                      "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                                      "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return b"data: " + orjson.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                             "model": model, "choices": [{"index": 0, "delta": delta,
                                                                          "finish_reason": finish_reason}]}) + b"\n\n"

        await resp.write(chunk({"role": "assistant", "content": ""}))
        if block["type"] == "tool_use":
            frags = reply.fragments[-1]
            await resp.write(chunk({"tool_calls": [{"index": 0, "id": _rand_id("call_", 24), "type": "function",
                                                    "function": {"name": block["name"], "arguments": ""}}]}))
            for f in frags:
                if f:
                    await resp.write(chunk({"tool_calls": [{"index": 0, "function": {"arguments": f}}]}))
        else:
            hold = request.headers.get("x-emulator-hold")
            for n, piece in enumerate(_chunk(reply.fragments[-1], TOKENS_PER_DELTA)):
                await resp.write(chunk({"content": piece}))
                if n == 0 and hold:
                    await asyncio.wait_for(self._hold(hold).wait(), 30)
                if self.tps > 0:
                    await asyncio.sleep(TOKENS_PER_DELTA / self.tps)
        await resp.write(chunk({}, finish))
        opts = doc.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({"id": cid, "object": "chat.completion.chunk",
                                                       "created": created, "model": model, "choices": [],
                                                       "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def start(host: str = "127.0.0.1", port: int = 0, **kw: Any
                ) -> tuple[web.AppRunner, int, OpenAICompatEmulator]:
    emu = OpenAICompatEmulator(**kw)
    runner = web.AppRunner(emu.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, runner.addresses[0][1], emu


async def register_loop(emu: OpenAICompatEmulator, router_url: str, token: str, pool: str, worker_id: str,
                        address: str, region: str, models: list[str], capacity: int, ttl_s: float) -> None:
    """A GPU worker's side of router/pools.py: register, then heartbeat (with the queue depth) at a
    third of the TTL; deregister on the way out."""
    import httpx

    url = f"{router_url}/v1/pools/{pool}/workers/{worker_id}"
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=5) as client:
        try:
            while True:
                body = {"address": address, "region": region, "models": models, "capacity": capacity,
                        "queue_depth": emu.in_flight, "ttl_s": ttl_s}
                try:
                    r = await client.put(url, json=body, headers=headers)
                    if r.status_code != 200:
                        print(f"registration refused ({r.status_code}): {r.text}", flush=True)
                except httpx.HTTPError as e:
                    print(f"registration failed: {e}", flush=True)
                await asyncio.sleep(ttl_s / 3)
        finally:
            with contextlib.suppress(httpx.HTTPError):
                await client.delete(url, headers=headers)


async def _main(args: argparse.Namespace) -> None:
    runner, port, emu = await start(args.host, args.port, api_key=args.api_key or None)
    address = f"{args.host}:{port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = []
    if args.register:
        token = os.environ.get(args.token_env, "")
        if not token:
            raise SystemExit(f"--register needs the registration token in ${args.token_env}")
        tasks.append(asyncio.create_task(register_loop(
            emu, args.register, token, args.pool, args.worker_id or f"emu-{port}", address, args.region,
            args.models.split(",") if args.models else [], args.capacity, args.ttl)))
    if args.ready_file:
        tmp = f"{args.ready_file}.tmp"
        with open(tmp, "w") as f:
            json.dump({"address": address, "pid": os.getpid()}, f)
        os.replace(tmp, args.ready_file)
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m emulators.openai_compat", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_COMPAT_API_KEY"), help="accepted bearer key")
    ap.add_argument("--ready-file")
    ap.add_argument("--register", metavar="URL", help="the router's registration API: register as a GPU worker")
    ap.add_argument("--token-env", default="CCR_POOL_TOKEN", help="variable holding the registration token")
    ap.add_argument("--pool", default="gpu")
    ap.add_argument("--worker-id")
    ap.add_argument("--region", default="")
    ap.add_argument("--models", default="", help="comma-separated model names served")
    ap.add_argument("--capacity", type=int, default=16)
    ap.add_argument("--ttl", type=float, default=3.0, help="heartbeat TTL in seconds (heartbeats at a third)")
    asyncio.run(_main(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
