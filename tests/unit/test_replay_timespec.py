"""The replay's range words: times (ISO-8601, relative), partition lists, offsets, durations."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streams.replay.timespec import (
    ReplayError,
    iso,
    parse_duration,
    parse_offsets,
    parse_partitions,
    parse_time,
)

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
NOW_MS = 1_717_243_200_000


def test_now_is_the_given_clock() -> None:
    assert parse_time("now", NOW) == NOW_MS


@pytest.mark.parametrize(
    ("text", "back_ms"),
    [
        ("-2h", 2 * 3600_000),
        ("-30m", 30 * 60_000),
        ("-1d", 86400_000),
        ("-90s", 90_000),
        ("-1w", 7 * 86400_000),
        ("-1.5h", 5400_000),
    ],
)
def test_relative_times_count_back_from_now(text: str, back_ms: int) -> None:
    assert parse_time(text, NOW) == NOW_MS - back_ms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-06-01T10:00:00Z", NOW_MS - 2 * 3600_000),
        ("2024-06-01T12:00:00+02:00", NOW_MS - 2 * 3600_000),
        ("2024-06-01T10:00:00", NOW_MS - 2 * 3600_000),  # naive means UTC
        ("2024-06-01", NOW_MS - 12 * 3600_000),
        ("2024-06-01T11:59:59.250Z", NOW_MS - 750),
    ],
)
def test_iso_8601(text: str, expected: int) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2h", "-2x", "2024-13-01", "", "-h"])
def test_a_malformed_time_says_what_is_expected(text: str) -> None:
    with pytest.raises(ReplayError) as err:
        parse_time(text, NOW)
    assert str(err.value) == (
        f"invalid time {text!r}: expected ISO-8601 (2024-06-01T10:00:00Z) or relative (-30m, -2h, -1d)"
    )


def test_iso_renders_milliseconds_in_utc() -> None:
    assert iso(NOW_MS + 5) == "2024-06-01T12:00:00.005Z"
    assert iso(None) is None and iso(-1) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", [0]),
        ("0,2", [0, 2]),
        ("2,0,2", [0, 2]),
        ("0-3", [0, 1, 2, 3]),
        ("0-1,5", [0, 1, 5]),
        (" 1 , 3 ", [1, 3]),
    ],
)
def test_partition_lists(text: str, expected: list[int]) -> None:
    assert parse_partitions(text) == expected


@pytest.mark.parametrize("text", ["a", "3-1", "", "1,", "-1", "0-"])
def test_bad_partition_lists(text: str) -> None:
    with pytest.raises(ReplayError) as err:
        parse_partitions(text)
    assert str(err.value) == f"invalid --partitions {text!r}: expected partition numbers such as 0,2 or 0-3"


def test_offsets_for_every_partition_or_per_partition() -> None:
    assert parse_offsets("1200", "--from-offset") == 1200
    assert parse_offsets("0:1200,2:900", "--from-offset") == {0: 1200, 2: 900}


@pytest.mark.parametrize("text", ["-5", "0:x", "0:1,0:2", "1:", "abc", "0=5"])
def test_bad_offsets(text: str) -> None:
    with pytest.raises(ReplayError) as err:
        parse_offsets(text, "--to-offset")
    assert str(err.value) == (
        f"invalid --to-offset {text!r}: expected an offset (1200) or partition:offset pairs (0:1200,2:900)"
    )


def test_durations() -> None:
    assert parse_duration("90s", "--retry-for") == 90
    assert parse_duration("5m", "--retry-for") == 300
    assert parse_duration("0", "--retry-for") == 0
    with pytest.raises(ReplayError) as err:
        parse_duration("soon", "--retry-for")
    assert str(err.value) == "invalid --retry-for 'soon': expected a duration such as 90s, 5m or 1h"
