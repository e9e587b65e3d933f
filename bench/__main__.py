"""``python -m bench [run] [options]`` and ``python -m bench compare A.json B.json``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from bench import BenchError
from bench.services import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL

COMMANDS = ("run", "compare")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _endpoint_list(text: str) -> tuple[str, ...]:
    from bench.run import ENDPOINTS

    values = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [value for value in values if value not in ENDPOINTS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"unknown endpoint(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {','.join(ENDPOINTS)}"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``run`` (the default) and ``compare``."""
    from bench.run import ENDPOINTS

    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark modelgate: HTTP load with wrk against real servers, and "
        "micro-benchmarks of the hot path.",
    )
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser(
        "run",
        help="run the benchmark (the default command)",
        description="Starts a fresh database, the echo app and `modelgate serve`, drives them "
        "with wrk, prints one table and writes bench/results/<timestamp>.json. Postgres and Redis "
        "come from MODELGATE_BENCH_DATABASE_URL and MODELGATE_BENCH_REDIS_URL; other MODELGATE_* "
        "variables are ignored so that runs stay comparable.",
    )
    run.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell (5)")
    run.add_argument(
        "--warmup", type=float, default=2.0, help="warm-up seconds per cell (2; 0: none)"
    )
    run.add_argument(
        "--connections", type=_int_list, default=(1, 16, 64), help="concurrencies (1,16,64)"
    )
    run.add_argument("--workers", type=_int_list, default=(1, 2), help="server workers (1,2)")
    run.add_argument(
        "--only",
        type=_endpoint_list,
        default=ENDPOINTS,
        help=f"endpoints to drive ({','.join(ENDPOINTS)})",
    )
    run.add_argument(
        "--micro",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the micro-benchmarks too (default: yes)",
    )
    run.add_argument(
        "--usage-records",
        type=int,
        default=10_000,
        help="usage records seeded before /me/usage is measured (10000)",
    )
    run.add_argument(
        "--usage-scale-records",
        type=int,
        default=1_000_000,
        help="records of the big tenant when measuring usage reads at scale (1000000; 0: skip)",
    )
    run.add_argument(
        "--output", type=Path, help="results file (default: bench/results/<UTC time>.json)"
    )
    compare = commands.add_parser("compare", help="compare two results files (B relative to A)")
    compare.add_argument("a", type=Path, metavar="A.json")
    compare.add_argument("b", type=Path, metavar="B.json")
    return parser


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM (e.g. from make or CI) unwinds like Ctrl-C, so servers and the database are cleaned.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help"):
        args_list.insert(0, "run")
    args = build_parser().parse_args(args_list)
    signal.signal(signal.SIGTERM, _terminate)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C must always clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.command == "compare":
            from bench.report import compare

            print(compare(args.a, args.b))
            return 0
        from bench.run import RunOptions, run

        if args.duration <= 0 or args.warmup < 0:
            raise BenchError("--duration must be positive and --warmup not negative")
        options = RunOptions(
            database_url=os.environ.get("MODELGATE_BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL,
            redis_url=os.environ.get("MODELGATE_BENCH_REDIS_URL") or DEFAULT_REDIS_URL,
            duration_s=args.duration,
            warmup_s=args.warmup,
            connections=args.connections,
            workers=args.workers,
            only=args.only,
            micro=args.micro,
            usage_records=max(0, args.usage_records),
            usage_scale_records=max(0, args.usage_scale_records),
            output=args.output,
        )
        return run(options)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped and the bench database dropped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
