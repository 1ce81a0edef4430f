"""Summarise a py-spy ``--format raw`` (collapsed stacks) profile: where the time goes.

``python -m bench.profile FILE [--top N]`` prints the functions with the most self
time, and the inclusive share of the relay's own steps (claim, publish, settle).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# Inclusive buckets, first match wins (matched against each frame, leaf last).
STEPS = {
    "relay: claim (SQL)": ("_lock_partitions", "fetch (asyncpg"),
    "relay: delete/settle (SQL)": ("execute (asyncpg",),
    "relay: build Outgoing from rows": ("_outgoing",),
    "rabbit: publish_many (frames, futures)": ("publish_many",),
    "rabbit: confirms arriving (aiormq reader)": ("_reader_loop", "__reader", "_on_return"),
    "asyncio loop (select, callbacks)": ("_run_once", "select ("),
}


def load(path: Path) -> Counter[str]:
    stacks: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def _name(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    match = re.match(r"(.*?) \((?:.*/)?([^/:]+)(?::\d+)?\)$", frame)
    return f"{match.group(1)} ({match.group(2)})" if match else frame


def summarise(stacks: Counter[str], top: int = 25) -> dict[str, object]:
    total = sum(stacks.values()) or 1
    self_time: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        leaf = _name(frames[-1])
        self_time[leaf] += count
        module = re.search(r"\((?:.*/)?(site-packages/)?([^/]+)/", frames[-1])
        modules[module.group(2) if module else leaf.split("(")[-1].rstrip(")")] += count
        for step, needles in STEPS.items():
            if any(any(n in frame for n in needles) for frame in frames):
                steps[step] += count
                break
        else:
            steps["other"] += count
    return {
        "samples": total,
        "steps": {k: round(100 * v / total, 1) for k, v in steps.most_common()},
        "self": [(k, round(100 * v / total, 1)) for k, v in self_time.most_common(top)],
        "packages": [(k, round(100 * v / total, 1)) for k, v in modules.most_common(12)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    summary = summarise(load(args.path), args.top)
    print(f"samples: {summary['samples']}")
    print("\ninclusive, by step (% of samples):")
    for step, share in summary["steps"].items():  # type: ignore[union-attr]
        print(f"  {share:5.1f}  {step}")
    print("\nself time, by package (% of samples):")
    for name, share in summary["packages"]:  # type: ignore[union-attr]
        print(f"  {share:5.1f}  {name}")
    print("\nself time, by function (% of samples):")
    for name, share in summary["self"]:  # type: ignore[union-attr]
        print(f"  {share:5.1f}  {name}")


if __name__ == "__main__":
    main()
