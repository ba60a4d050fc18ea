"""Hold one bench gateway up, from the checkout given, until SIGTERM: what bench/gateway_ab.py runs for a side
whose code is another checkout's (`--a-tree` / `--b-tree`).

    .venv/bin/python bench/gateway_hold.py --tree /tmp/base --ready F [KEY=VALUE ...]

Every import (this process's and the gateway's children's, through PYTHONPATH) resolves in --tree, so that
side runs its own code end to end; the config is that tree's bench config (bench/gateway.py
`gateway_config`) with the KEY=VALUE overrides. The ready file gets the gateway's URL, a bench API key and
the PIDs of its processes (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import yaml


def override(path: Path, items: list[str]) -> None:
    """Set dotted KEY=VALUE items (VALUE is YAML) in the config file at `path`."""
    cfg = yaml.safe_load(path.read_text())
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"overrides are KEY=VALUE, not {item!r}")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(cfg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", required=True, type=Path, help="the checkout whose code this gateway runs")
    ap.add_argument("--ready", required=True, type=Path)
    ap.add_argument("items", nargs="*", help="KEY=VALUE config overrides")
    args = ap.parse_args()
    tree = args.tree.resolve()
    if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != str(tree):
        raise SystemExit("run with PYTHONPATH starting with --tree, so the gateway's children import it too")
    sys.path.insert(0, str(tree))
    import bench.gateway as g  # that tree's
    from extauth.keys import create_key

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="ccr-hold-") as d:
        path = g.gateway_config(Path(d))
        override(path, args.items)
        gw = g.Gateway(path)
        try:
            gw.start()
            assert gw.runtime is not None
            _, key = create_key(gw.runtime.postgres_dsn, "bench", ["default"], rpm=10_000_000)
            tmp = args.ready.with_suffix(".tmp")
            tmp.write_text(json.dumps({"url": gw.url, "key": key, "pids": {c.name: c.pid for c in gw.children}}))
            tmp.rename(args.ready)
            stop.wait()
        finally:
            gw.stop()


if __name__ == "__main__":
    main()
