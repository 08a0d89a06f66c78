"""The `kotel` console script.

Subcommands are discovered through the ``kotel.commands`` entry-point group, each a
``register(subparsers)`` callable. That keeps the dependency arrow pointing one way: the core
never imports ``agents`` or ``streams``, they plug themselves in.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from kotel import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kotel",
        description="Kafka-native OpenTelemetry pipeline: agents, stream stages, sinks, replay.",
    )
    parser.add_argument("--version", action="version", version=f"kotel {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="kotel.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as exc:  # one broken plugin must not take every other command down with it
            _unavailable(subparsers, ep.name, f"{type(exc).__name__}: {exc}")
            continue
        register(subparsers)
    return parser


def _unavailable(subparsers: argparse._SubParsersAction, name: str, reason: str) -> None:
    parser = subparsers.add_parser(name, help=f"(unavailable: {reason})")
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def fail(_: argparse.Namespace) -> int:
        print(f"kotel {name} is unavailable in this installation: {reason}", file=sys.stderr)
        return 1

    parser.set_defaults(func=fail)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        # `kotel` or `kotel kafka` without an action: show what is available instead of failing quietly.
        (getattr(args, "subparser", None) or parser).print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
