"""Top frames of a py-spy raw (collapsed stacks) profile: self and total share of the samples.

    .venv/bin/python bench/pyspy_top.py /tmp/ratelimit.raw [N]

Self: the frame was the innermost one. Total: the frame was anywhere on the stack (counted once
per sample even when it recurses).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path


def tops(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    n = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        n += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    return n, own, total


def main() -> None:
    n, own, total = tops(Path(sys.argv[1]))
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    print(f"samples: {n}")
    for title, counts in (("self", own), ("total", total)):
        print(f"{title}:")
        for frame, c in counts.most_common(k):
            print(f"  {100 * c / max(n, 1):5.1f}%  {frame}")


if __name__ == "__main__":
    main()
