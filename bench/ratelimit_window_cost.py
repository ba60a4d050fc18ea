"""Redis CPU per rate-limit decision in steady state: ccr's rules with every sliding-window slot in use.

    .venv/bin/python bench/ratelimit_window_cost.py [--decisions 3000] [--rounds 3]

bench/ratelimit_check.py runs 2 s, so its sliding windows hold one or two slots; a window busy for a
whole minute holds 60. This fills 60 one-second slots in each of four sliding windows (as
ratelimit/counters.py lays them out: slots, running sum `s`, oldest `lo`, newest `hi`), adds a token
bucket, then runs the decision script (one EVALSHA, allow path) and reads Redis's own CPU (INFO cpu)
before and after. Private Redis; the figure is Redis's CPU per decision, not latency.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccr.localservers import start_redis  # noqa: E402
from ratelimit.counters import Algorithm, CounterOp, Counters  # noqa: E402

MIN = 60_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decisions", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        child = start_redis(Path(d) / "redis", Path(d) / "logs")
        try:
            url = str(child.info["url"])
            r = redis.Redis.from_url(url)
            figures = []
            for rnd in range(args.rounds):
                counters = Counters(redis.Redis.from_url(url))
                windows = [f"bench:{rnd}:{k}" for k in "pktm"]
                sec = int(r.time()[0])
                for k in windows:
                    r.hset(k, mapping={**{str(sec - j): 1 for j in range(60)}, "s": 60, "lo": sec - 59, "hi": sec})
                ops = [CounterOp(k, Algorithm.SLIDING, 1, MIN, 10**9) for k in windows]
                ops.append(CounterOp(f"bench:{rnd}:g", Algorithm.BUCKET, 1, 60 * MIN, 10**9, 10**9))
                counters.run(ops)
                info = r.info("cpu")
                before = info["used_cpu_user"] + info["used_cpu_sys"]
                for _ in range(args.decisions):
                    counters.run(ops)
                info = r.info("cpu")
                figures.append((info["used_cpu_user"] + info["used_cpu_sys"] - before) / args.decisions * 1e6)
                counters.close()
            print("Redis CPU per decision (4 sliding windows with 60 slots each + 1 token bucket): "
                  + ", ".join(f"{f:.0f} us" for f in figures))
        finally:
            child.stop()


if __name__ == "__main__":
    main()
