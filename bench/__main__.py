"""``python -m bench [relay|write|consumer|e2e|steady|all] [--quick] [--long] [--out DIR]``."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from pathlib import Path

from bench.env import BenchEnv, private_services
from bench.report import Results
from postroom.process import loop_factory

PHASES = ("relay", "write", "consumer", "e2e", "steady")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("phase", nargs="?", default="all", choices=(*PHASES, "all"))
    parser.add_argument("--quick", action="store_true", help="small sizes: about 2 minutes")
    parser.add_argument(
        "--long", action="store_true", help="include the 10-minute steady-state phase"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also run under py-spy (relay, consumer)"
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of every process, raw baselines included (postroom's default: uvloop)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


async def run_phases(env: BenchEnv, args: argparse.Namespace, results: Results) -> None:
    phases = PHASES if args.phase == "all" else (args.phase,)
    stamp = results.notes["stamp"]
    for phase in phases:
        if phase == "relay":
            from bench import relay_drain

            profile = args.out / f"relay-profile-{stamp}.txt" if args.profile else None
            await relay_drain.run(env, results, quick=args.quick, profile=profile)
        elif phase == "write":
            from bench import write_path

            await write_path.run(env, results, quick=args.quick)
        elif phase == "consumer":
            from bench import consume

            profile = args.out / f"consumer-profile-{stamp}.txt" if args.profile else None
            await consume.run(env, results, quick=args.quick, profile=profile)
        elif phase == "e2e":
            from bench import e2e

            await e2e.run(env, results, quick=args.quick)
        elif phase == "steady":
            if not args.long and args.phase != "steady":
                continue
            from bench import steady

            await steady.run(env, results, quick=args.quick, out=args.out)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = Results(mode="quick" if args.quick else "full", command=command.strip())
    results.notes["stamp"] = stamp
    started = time.perf_counter()
    results.notes["event_loop"] = args.loop
    with private_services(args.loop) as env:
        print(f"bench: database {env.database}, vhost {env.vhost}", flush=True)
        try:
            with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
                runner.run(run_phases(env, args, results))
        finally:
            results.notes["wall_seconds"] = round(time.perf_counter() - started, 1)
            results.resolve_ratios()
            print()
            print(results.table())
            for path in results.write(args.out, stamp):
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
