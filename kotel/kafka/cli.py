"""`kotel kafka start|stop|status|fetch`: a local Kafka broker for development, tests and CI."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from kotel.kafka.broker import (
    BrokerSettings,
    BrokerStatus,
    KafkaBroker,
    KafkaBrokerError,
    UserError,
    fetch_jars,
)

Action = Callable[[argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "kafka",
        help="run a local Apache Kafka broker (KRaft, no Docker)",
        description="Run a single-node Apache Kafka broker from Maven Central jars. State lives in "
        "$KOTEL_HOME/kafka, jars in $KOTEL_CACHE; KOTEL_KAFKA_VERSION and KOTEL_KAFKA_HEAP set defaults.",
    )
    parser.set_defaults(subparser=parser)
    actions = parser.add_subparsers(dest="kafka_action", metavar="ACTION")

    start = actions.add_parser(
        "start",
        help="start the broker in the background (no-op if running)",
        description="Start the broker in the background and wait until it answers.",
    )
    start.add_argument("--port", type=int, help="client (PLAINTEXT) port, default 9092")
    start.add_argument("--controller-port", type=int, help="KRaft controller port, default 9093")
    start.add_argument("--version", help="Kafka version, default $KOTEL_KAFKA_VERSION or 4.1.1")
    start.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the broker to answer, default 60"
    )
    start.set_defaults(func=_guarded(_start))

    stop = actions.add_parser(
        "stop",
        help="stop the broker (SIGTERM, SIGKILL after 30 s)",
        description="Stop the broker cleanly; kill it if it has not exited after 30 s.",
    )
    stop.set_defaults(func=_guarded(_stop))

    status = actions.add_parser(
        "status",
        help="show whether the broker runs; exit 0 if it does, 1 if not",
        description="Show where the broker listens, its pid, log file and data dir.",
    )
    status.set_defaults(func=_guarded(_status))

    fetch = actions.add_parser(
        "fetch",
        help="download (or verify the cache of) the broker jars only",
        description="Download the broker jars into the cache; used by CI before tests.",
    )
    fetch.add_argument("--version", help="Kafka version, default $KOTEL_KAFKA_VERSION or 4.1.1")
    fetch.set_defaults(func=_guarded(_fetch))


def _guarded(action: Action) -> Action:
    """Turns our errors into one line on stderr: exit 2 for what the user fixes, 1 for broker failures."""

    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except UserError as exc:
            print(f"kotel kafka: {exc}", file=sys.stderr)
            return 2
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
            )
            print(f"kotel kafka: invalid settings: {problems}", file=sys.stderr)
            return 2
        except KafkaBrokerError as exc:
            print(f"kotel kafka: {exc}", file=sys.stderr)
            return 1

    return run


def _settings(args: argparse.Namespace) -> BrokerSettings:
    return BrokerSettings.from_env(
        port=getattr(args, "port", None),
        controller_port=getattr(args, "controller_port", None),
        version=getattr(args, "version", None),
    )


def _start(args: argparse.Namespace) -> int:
    result = KafkaBroker(_settings(args)).start(timeout=args.timeout)
    st = result.status
    if result.already_running:
        print(f"Kafka {st.version} broker already running on {st.bootstrap} (pid {st.pid}); nothing to do")
        return 0
    kind = "cold: jars downloaded" if result.downloaded else "warm: jars cached"
    took = f"{result.seconds:.1f} s ({kind})"
    print(f"Kafka {st.version} broker started on {st.bootstrap} (pid {st.pid}) in {took}")
    print(f"  log file: {st.log_file}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    pid = KafkaBroker(_settings(args)).stop()
    print("Kafka broker was not running" if pid is None else f"Kafka broker stopped (pid {pid})")
    return 0


def _status(args: argparse.Namespace) -> int:
    st = KafkaBroker(_settings(args)).status()
    print(_describe(st))
    return 0 if st.running else 1


def _describe(st: BrokerStatus) -> str:
    head = (
        f"Kafka {st.version} broker running on {st.bootstrap} (pid {st.pid})"
        if st.running
        else "Kafka broker not running"
    )
    return f"{head}\n  log file: {st.log_file}\n  data dir: {st.data_dir}"


def _fetch(args: argparse.Namespace) -> int:
    settings = _settings(args)
    begin = time.monotonic()
    libs, downloaded = fetch_jars(settings)
    verb = "downloaded" if downloaded else "already cached"
    jars = sum(1 for _ in libs.glob("*.jar"))
    print(f"Kafka {settings.version} jars {verb}: {jars} jars in {libs} ({time.monotonic() - begin:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kotel.kafka.cli ACTION`: the same commands without loading the other kotel plugins."""
    parser = argparse.ArgumentParser(prog="kotel")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kafka", *(sys.argv[1:] if argv is None else argv)])
    func = getattr(args, "func", None)
    if func is None:
        args.subparser.print_help()
        return 2
    return int(func(args))


if __name__ == "__main__":
    sys.exit(main())
