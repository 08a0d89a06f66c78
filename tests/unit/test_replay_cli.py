"""The command line without a broker: relative times as values, and bad input refused with exit 2 and
one exact line before any Kafka client is made (tests/integration/test_replay.py has those that need one)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from streams.replay.cli import build_parser, main, register


def test_relative_times_are_values_through_the_kotel_entry_point() -> None:
    parser = argparse.ArgumentParser(prog="kotel")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", "--topic", "t", "--from", "-2h", "--to", "-30m", "--dry-run"])
    assert (args.from_time, args.to_time, args.command) == ("-2h", "-30m", "replay")
    args = build_parser().parse_args(["--topic", "t", "--from", "-1.5d", "--to-offset", "0:5"])
    assert (args.from_time, args.to_offset) == ("-1.5d", "0:5")


@pytest.mark.parametrize(("argv", "message"), [
    (["--topic", "t"], "choose a target: --to-topic, --to-sink, --to-parquet, --to-origin or --redrive "
                       "(or --dry-run)"),
    (["--topic", "t", "--to-sink", "loki"],
     "--to-sink needs --topology FILE (the sink is an exporter of its gateway section)"),
    (["--from-parquet", "p", "--from", "-1h", "--to-topic", "x"],
     "--partitions, --from, --to, --from-offset, --to-offset and --from-group select Kafka records; "
     "--from-parquet replays whole files"),
    (["--topic", "t", "--to-topic", "x", "--resume", "--fresh"], "--resume and --fresh exclude each other"),
    (["--from-parquet", "p", "--redrive"],
     "--redrive re-sends dead letters read from a topic: add --topic <prefix>.deadletter"),
    (["--topic", "t", "--to-origin"], "--to-origin sends Parquet rows to the topic each names; from a topic, "
                                      "use --to-topic (or --redrive for dead letters)"),
    (["--topic", "t", "--to-topic", "x", "--from", "06-01T25:00"],
     "invalid time '06-01T25:00': expected ISO-8601 (2024-06-01T10:00:00Z) or relative (-30m, -2h, -1d)"),
    (["--topic", "t", "--to-topic", "x", "--from", "-1h", "--to", "-2h"],
     "--from -1h is later than --to -2h"),
    (["--topic", "t", "--to-topic", "x", "--from-offset", "9", "--to-offset", "3"],
     "--from-offset 9 is after --to-offset 3"),
    (["--topic", "t", "--to-topic", "x", "--partitions", "x"],
     "invalid --partitions 'x': expected partition numbers such as 0,2 or 0-3"),
    (["--topic", "t", "--to-topic", "x", "--retry-for", "later"],
     "invalid --retry-for 'later': expected a duration such as 90s, 5m or 1h"),
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(["--bootstrap", "127.0.0.1:1", *argv]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"kotel replay: {message}\n")


def test_a_parquet_source_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "spill"
    assert main(["--from-parquet", str(missing), "--to-parquet", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"kotel replay: {missing} is not a directory\n"


def test_a_rate_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--topic", "t", "--max-rate", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith("argument --max-rate: expected a number > 0, got '0'\n")
