"""Summarise a py-spy ``--format raw`` (collapsed stacks) profile: where the time goes.

``python -m bench.profile FILE [--top N]`` prints the functions with the most self
time, the share of each layer (by the sampled leaf frame: the stacks of coroutines and
SQLAlchemy's greenlets are cut at each await, so inclusive shares undercount), and for
a relay profile the inclusive share of its own steps (claim, publish, settle).
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


# Layers by leaf frame, first match wins. Under uvloop a socket send shows as the
# Cython frame that called it, so the asyncpg rows include their round trips' syscalls.
LAYERS = {
    "asyncpg: BEGIN/COMMIT (simple queries, incl. send)": ("Connection.execute (asyncpg",),
    "asyncpg: INSERT/SELECT (prepared, incl. send)": ("prepared_stmt.py", "asyncpg/"),
    "event loop (uvloop/asyncio, epoll, callbacks)": ("asyncio/", "runners.py", "uvloop"),
    "SQLAlchemy (session, engine, compiled cache)": ("sqlalchemy/", "greenlet"),
    "AMQP client (aio-pika, aiormq, pamqp)": ("aio_pika/", "aiormq/", "pamqp/"),
    "postroom": ("postroom/",),
    "pydantic, logging, metrics": ("pydantic", "structlog/", "logging/", "prometheus_client/"),
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
    layers: Counter[str] = Counter()
    relay = any("relay.py" in stack for stack in stacks)
    for stack, count in stacks.items():
        frames = stack.split(";")
        leaf = _name(frames[-1])
        self_time[leaf] += count
        module = re.search(r"\((?:.*/)?(site-packages/)?([^/]+)/", frames[-1])
        modules[module.group(2) if module else leaf.split("(")[-1].rstrip(")")] += count
        layer = next((k for k, v in LAYERS.items() if any(n in frames[-1] for n in v)), "other")
        layers[layer] += count
        for step, needles in STEPS.items() if relay else ():
            if any(any(n in frame for n in needles) for frame in frames):
                steps[step] += count
                break
        else:
            steps["other"] += count
    return {
        "samples": total,
        "steps": {k: round(100 * v / total, 1) for k, v in steps.most_common()} if relay else {},
        "layers": {k: round(100 * v / total, 1) for k, v in layers.most_common()},
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
    if summary["steps"]:
        print("\ninclusive, by relay step (% of samples):")
        for step, share in summary["steps"].items():  # type: ignore[union-attr]
            print(f"  {share:5.1f}  {step}")
    print("\nself time, by layer (% of samples):")
    for layer, share in summary["layers"].items():  # type: ignore[union-attr]
        print(f"  {share:5.1f}  {layer}")
    print("\nself time, by package (% of samples):")
    for name, share in summary["packages"]:  # type: ignore[union-attr]
        print(f"  {share:5.1f}  {name}")
    print("\nself time, by function (% of samples):")
    for name, share in summary["self"]:  # type: ignore[union-attr]
        print(f"  {share:5.1f}  {name}")


if __name__ == "__main__":
    main()
