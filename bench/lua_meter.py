"""Time the usage meter per reply: router/meter.lua (LuaJIT, via lupa) against the Python meter.

    .venv/bin/python bench/lua_meter.py [--duration 2] [--output-tokens 0,2000]

Starts the Anthropic emulator, sends it the agent request (tests/fixtures/agent_request_90k.json)
streamed and with "stream": false (once per --output-tokens value: 0 is the emulator's own reply length
for this request, a longer one shows the per-delta cost), keeps each reply's body as it
arrived (the chunks an upstream filter would see), stops the emulator, then meters each reply over
and over:

* lua: what the Envoy Lua filter does per reply: plan from the headers, feed every chunk, publish
  the assessment when it changes (into a table standing in for Envoy's dynamic metadata), finish;
  the loop runs inside LuaJIT, so no Python/Lua crossing is timed;
* python: what the adapter does per reply besides gRPC: the handler's meter, feed every chunk,
  assess and build the metadata Struct when it changes, finish.

Figures are µs of one core per reply; on a shared machine they move from run to run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from lupa import luajit21

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccr.procs import spawn, wait_ready_file  # noqa: E402
from router.adapter.server import AnthropicHandler, usage_struct  # noqa: E402
from router.usage import Assessment, assess  # noqa: E402

KEY = "sk-bench-lua-meter"
METER_LUA = REPO / "router" / "meter.lua"

# Runs one reply `n` times with the filter's own plan/publish functions; a fake handle gives
# a dynamic metadata object whose set() stores into a table.
LUA_BENCH = r"""
local M = ...
return function(ctype, chunks, n)
  local ns = {}
  local md = { set = function(_, _, k, v) ns[k] = v end }
  local info = { dynamicMetadata = function() return md end }
  local handle = { streamInfo = function() return info end }
  local nchunks = #chunks
  local t0 = os.clock()
  for _ = 1, n do
    local last = {}
    local _, a0, meter, streaming = M.plan(200, ctype, nil)
    M.publish(handle, last, a0)
    for i = 1, nchunks do
      if meter:feed(chunks[i]) then M.publish(handle, last, M.assess(meter.result, streaming, false)) end
    end
    last.status = nil
    M.publish(handle, last, M.assess(meter:finish(), streaming, true))
  end
  return os.clock() - t0, ns.usage_status, ns.output_tokens
end
"""


def fetch_replies(tmp: Path, output_tokens: list[int]) -> dict[str, tuple[str, list[bytes]]]:
    ready = tmp / "emulator.ready"
    emu = spawn("emulator", [sys.executable, "-m", "emulators.anthropic", "--host", "127.0.0.1", "--port", "0",
                             "--api-key", KEY, "--ready-file", str(ready)], tmp / "logs", cwd=REPO)
    try:
        info = wait_ready_file(emu, ready)
        url = f"http://{info['address']}/v1/messages"
        body = json.loads((REPO / "tests" / "fixtures" / "agent_request_90k.json").read_text())
        out = {}
        for tokens in output_tokens:
            for name, stream in (("streamed", True), ("unstreamed", False)):
                headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "accept-encoding": "identity"}
                if tokens:
                    headers["x-emulator-output-tokens"] = str(tokens)
                with httpx.stream("POST", url, json={**body, "stream": stream}, timeout=60, headers=headers) as r:
                    r.raise_for_status()
                    out[f"{name}/{tokens or 'default'}"] = (r.headers["content-type"], list(r.iter_raw()))
        return out
    finally:
        emu.stop()


def time_lua(ctype: str, chunks: list[bytes], duration: float) -> tuple[float, str]:
    lua = luajit21.LuaRuntime(encoding=None)
    run = lua.execute(LUA_BENCH.encode(), lua.execute(METER_LUA.read_bytes()))
    table = lua.table_from(chunks)
    run(ctype.encode(), table, 50)  # warm up (and let LuaJIT compile)
    n = 50
    while True:
        spent, status, out = run(ctype.encode(), table, n)
        if spent >= duration / 4 or n >= 10_000_000:
            break
        n *= 4
    reps = max(1, int(n * (duration / 2) / max(spent, 1e-9)))
    spent, status, out = run(ctype.encode(), table, reps)
    return spent / reps * 1e6, f"{status.decode()} output_tokens={out}"


def python_reply(handler: AnthropicHandler, headers: dict[str, str], chunks: list[bytes]) -> Assessment:
    meter = handler.meter(200, headers, has_body=True)
    assert not isinstance(meter, Assessment)
    streaming = headers["content-type"].startswith("text/event-stream")
    last = assess(meter.result, streaming, ended=False)
    usage_struct(last)
    for c in chunks:
        if meter.feed(c):
            a = assess(meter.result, streaming, ended=False)
            if a != last:
                last = a
                usage_struct(a)
    a = assess(meter.finish(), streaming, ended=True)
    usage_struct(a)
    return a


def time_python(ctype: str, chunks: list[bytes], duration: float) -> tuple[float, str]:
    handler = AnthropicHandler("bench")
    headers = {":status": "200", "content-type": ctype}
    a = python_reply(handler, headers, chunks)
    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < duration / 2:
        python_reply(handler, headers, chunks)
        n += 1
    spent = time.process_time() - t0
    return spent / n * 1e6, f"{a.status.value} output_tokens={a.usage['output_tokens'] if a.usage else None}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds of CPU per meter and reply (about)")
    ap.add_argument("--output-tokens", default="0,2000",
                    help="comma-separated reply lengths to ask the emulator for (x-emulator-output-tokens)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ccr-bench-lua-") as tmp:
        replies = fetch_replies(Path(tmp), [int(t) for t in args.output_tokens.split(",")])
    print(f"{'reply':<18} {'chunks':>6} {'bytes':>8}  {'meter':<7} {'us/reply':>9}  result")
    for name, (ctype, chunks) in replies.items():
        size = sum(map(len, chunks))
        for meter, timer in (("lua", time_lua), ("python", time_python)):
            us, result = timer(ctype, chunks, args.duration)
            print(f"{name:<18} {len(chunks):>6} {size:>8}  {meter:<7} {us:>9.1f}  {result}")


if __name__ == "__main__":
    main()
