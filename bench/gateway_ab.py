"""Two full gateways side by side, differing in some config values or in their code: req/s and server CPU per
request by process, alternating short rounds between them so the machine's other work disturbs both alike.

    .venv/bin/python bench/gateway_ab.py --b telemetry.metrics=false [--b spend.enabled=false ...] [--paced 400]
                                         [--a KEY=VALUE ...] [--rounds 3] [--duration 2] [-c 32] [--no-stream]
    git worktree add /tmp/base <rev> && .venv/bin/python bench/gateway_ab.py --a-tree /tmp/base [--rounds 8]

`--a-tree` / `--b-tree DIR` runs that side from another checkout (bench/gateway_hold.py: its own bench config
and code, in every process); a change is measured against its base, side by side.

KEY is a dotted path into ccr.example.yaml as bench/gateway.py uses it (its `gateway_config`), VALUE is
YAML (`false`, `{postgres: false}`; the string off is `"'off'"`, as YAML reads a bare off as false).
Both gateways run at once (embedded PostgreSQL/Redis each, the
emulator as upstream); each round measures A then B (then B then A on the next round) at one closed-loop
concurrency. Prints each round and the medians; compare the two columns with each other, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gateway as g  # noqa: E402  (bench/gateway.py)
from gateway_hold import override  # noqa: E402

from ccr.procs import spawn, wait_until  # noqa: E402
from ccr.supervisor import Gateway  # noqa: E402


def start(stack: ExitStack, label: str, items: list[str], tree: Path | None = None) -> g.Target:
    if tree is not None:
        return start_tree(stack, label, items, tree)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"ccr-ab-{label}-")))
    path = g.gateway_config(tmp)
    override(path, items)
    gw = Gateway(path)
    stack.callback(gw.stop)
    gw.start()
    assert gw.runtime is not None
    from extauth.keys import create_key

    _, key = create_key(gw.runtime.postgres_dsn, "bench", ["default"], rpm=10_000_000)
    print(f"{label}: {' '.join(items) or '(example config)'} at {gw.url}", file=sys.stderr)
    return g.Target(label, gw.url, key, {c.name: c.pid for c in gw.children})


def start_tree(stack: ExitStack, label: str, items: list[str], tree: Path) -> g.Target:
    """The gateway of another checkout, held up by bench/gateway_hold.py in a child of its own (by PID)."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"ccr-ab-{label}-")))
    ready = tmp / "ready.json"
    tree = tree.resolve()
    child = spawn(f"hold-{label}", [sys.executable, str(Path(__file__).resolve().parent / "gateway_hold.py"),
                                    "--tree", str(tree), "--ready", str(ready), *items], tmp,
                  env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))},
                  cwd=tree)
    stack.callback(child.stop)
    wait_until(child, ready.exists, 240, f"gateway {label} from {tree}")
    info = json.loads(ready.read_text())
    print(f"{label}: {tree} {' '.join(items) or '(its bench config)'} at {info['url']}", file=sys.stderr)
    return g.Target(label, info["url"], info["key"], info["pids"])


def per_request(r: g.Result) -> dict[str, float]:
    return {n: v * 1000 / len(r.ok) for n, v in r.server_cpu.items()} if r.ok else {}


async def rounds(a: g.Target, b: g.Target, args: argparse.Namespace) -> dict[str, list[g.Result]]:
    body = g.request_body(not args.no_stream)
    out: dict[str, list[g.Result]] = {"A": [], "B": []}
    for i in range(args.rounds):
        order = (a, b) if i % 2 == 0 else (b, a)
        for t in order:
            if args.paced:
                r = await g.run_paced(t, body, not args.no_stream, args.paced, args.duration)
            else:
                r = await g.run_level(t, body, not args.no_stream, args.c, args.requests, args.duration)
            out[t.layer].append(r)
            cpu = per_request(r)
            print(f"round {i + 1} {t.layer}: {r.rps:7.1f} req/s, {r.errors} errors, p50 {r.p50:6.1f} ms, "
                  f"p99 {r.p99:6.1f} ms, CPU ms/req "
                  f"{g.cpu_per_request(r):.2f} without the {g.UPSTREAM}: "
                  + ", ".join(f"{n} {v:.2f}" for n, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.005),
                  flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", action="append", default=[], help="KEY=VALUE for gateway A (default: none)")
    ap.add_argument("--b", action="append", default=[], help="KEY=VALUE for gateway B")
    ap.add_argument("--a-tree", type=Path, help="run gateway A from this checkout (e.g. a git worktree of the base)")
    ap.add_argument("--b-tree", type=Path, help="run gateway B from this checkout")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("-c", type=int, default=32, help="closed-loop concurrency")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--no-stream", action="store_true", help="the request with \"stream\": false")
    ap.add_argument("--paced", type=float, default=0.0,
                    help="open loop at this many req/s (--duration s per round) instead of closed loop at -c: "
                         "latency under a load both sides can carry")
    args = ap.parse_args()
    with ExitStack() as stack:
        a = start(stack, "A", args.a, args.a_tree)
        b = start(stack, "B", args.b, args.b_tree)
        out = asyncio.run(rounds(a, b, args))
    load = f"paced at {args.paced:g} req/s" if args.paced else f"c={args.c}"
    print(f"\nmedians over {args.rounds} rounds, {load}, {'unstreamed' if args.no_stream else 'streamed'}:")
    print(f"  A = {args.a_tree or ''} {' '.join(args.a) or '(example config)'}\n"
          f"  B = {args.b_tree or ''} {' '.join(args.b) or '(example config)'}")
    names = sorted({n for rs in out.values() for r in rs for n in r.server_cpu})
    med = {k: {n: statistics.median(per_request(r).get(n, 0.0) for r in rs) for n in names} for k, rs in out.items()}
    rps = {k: statistics.median(r.rps for r in rs) for k, rs in out.items()}
    own = {k: statistics.median(g.cpu_per_request(r) for r in rs) for k, rs in out.items()}
    print(f"  {'':<14}{'A':>8}{'B':>8}{'B-A':>8}")
    print(f"  {'req/s':<14}{rps['A']:8.1f}{rps['B']:8.1f}{rps['B'] - rps['A']:+8.1f}")
    p50 = {k: statistics.median(r.p50 for r in rs) for k, rs in out.items()}
    ttfb = {k: statistics.median(r.ttfb_p50 for r in rs) for k, rs in out.items()}
    print(f"  {'p50 ms':<14}{p50['A']:8.2f}{p50['B']:8.2f}{p50['B'] - p50['A']:+8.2f}")
    p99 = {k: statistics.median(r.p99 for r in rs) for k, rs in out.items()}
    print(f"  {'p99 ms':<14}{p99['A']:8.2f}{p99['B']:8.2f}{p99['B'] - p99['A']:+8.2f}")
    print(f"  {'TTFB p50 ms':<14}{ttfb['A']:8.2f}{ttfb['B']:8.2f}{ttfb['B'] - ttfb['A']:+8.2f}")
    print(f"  {'CPU ms/req':<14}{own['A']:8.3f}{own['B']:8.3f}{own['B'] - own['A']:+8.3f}  (without the {g.UPSTREAM})")
    for n in sorted(names, key=lambda n: -med["A"][n]):
        if med["A"][n] >= 0.005 or med["B"][n] >= 0.005:
            print(f"  {n:<14}{med['A'][n]:8.3f}{med['B'][n]:8.3f}{med['B'][n] - med['A'][n]:+8.3f}")


if __name__ == "__main__":
    main()
