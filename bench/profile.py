"""Summarise a py-spy raw (collapsed-stack) profile: where the time of each stage goes.

    py-spy record --format raw -o profile.raw -- python -m bench.pipeline ...
    python -m bench.profile profile.raw

Prints, for every thread's samples together, the functions of ours (inclusive share) and the
frames that were on top of the stack (self share), so a stage's cost can be attributed.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

OURS = re.compile(r"\((?:server|partners|privacy|cli|bench)/[^)]*\)")
IDLE = ("_worker (concurrent/futures/thread.py", "_serve (grpc/_server.py", "wait (threading.py")


def summarise(raw: Path, top: int = 25) -> str:
    """The two tables as text."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(frames[-1].startswith(idle) for idle in IDLE):
            continue  # an idle server or pool thread, not work
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in {f for f in frames if OURS.search(f)}:
            inclusive[frame] += n
    lines = [f"{total} busy samples (all threads)", "", "our functions, inclusive share:"]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["", "frames on top of the stack, self share:"]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    """Print the summary of one raw profile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarise(args.raw, args.top))


if __name__ == "__main__":
    main()
