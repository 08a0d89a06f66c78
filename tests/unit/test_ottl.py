"""OTTL conditions against real OTLP protobuf messages: paths per context, comparison semantics, converters,
precedence, exact error messages, and property tests tying the compiled closures to plain Python."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, SeverityNumber
from opentelemetry.proto.metrics.v1 import metrics_pb2 as mpb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from kotel.otlp.attributes import any_value
from kotel.ottl import OttlError, compile_condition, compile_conditions

TRACE_ID = bytes(range(1, 17))
SPAN_ID = bytes(range(1, 9))


def av(value: Any) -> AnyValue:
    return any_value(value)


def kvs(attrs: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=av(v)) for k, v in attrs.items()]


RESOURCE = Resource(
    attributes=kvs({"service.name": "checkout", "tenant": "acme"}), dropped_attributes_count=2
)
SCOPE = InstrumentationScope(name="io.otel.http", version="1.2.3", attributes=kvs({"lib": "aiohttp"}),
                             dropped_attributes_count=1)  # fmt: skip
SPAN = Span(
    name="GET /api/orders", kind=Span.SPAN_KIND_SERVER, trace_id=TRACE_ID, span_id=SPAN_ID,
    parent_span_id=b"\x09" * 8, trace_state="vendor=abc,rojo=00f067", flags=257,
    start_time_unix_nano=1_000, end_time_unix_nano=5_000, dropped_attributes_count=3,
    dropped_events_count=4, dropped_links_count=5,
    status=Status(code=Status.STATUS_CODE_ERROR, message="boom"),
    attributes=kvs({"http.target": "/api/orders", "code": 503, "ratio": 0.5, "ok": False, "raw": b"\x01\x02",
                    "nested": {"a": {"b": "deep"}}, "list": ["x", "y"], "empty": None}),
)  # fmt: skip


def span_is(text: str, span: Span = SPAN) -> bool:
    return compile_condition(text, "span")(span, SCOPE, RESOURCE)


def error_of(text: str, context: str = "span") -> str:
    with pytest.raises(OttlError) as caught:
        compile_condition(text, context)  # type: ignore[arg-type]
    return str(caught.value)


# --- the seed condition and paths per context -----------------------------------------------------------


def test_seed_condition_matches_only_the_health_target() -> None:
    cond = compile_condition('attributes["http.target"] == "/health"', "span")
    assert cond(Span(attributes=kvs({"http.target": "/health"})), SCOPE, RESOURCE) is True
    assert cond(Span(attributes=kvs({"http.target": "/api"})), SCOPE, RESOURCE) is False
    assert cond(Span(), SCOPE, RESOURCE) is False


SPAN_PATHS = [  # (path, its value in SPAN as a literal, a different literal of the same type)
    ("name", '"GET /api/orders"', '"GET"'),
    ("span.name", '"GET /api/orders"', '"GET"'),
    ("kind", "SPAN_KIND_SERVER", "SPAN_KIND_CLIENT"),
    ("status.code", "STATUS_CODE_ERROR", "STATUS_CODE_OK"),
    ("status.message", '"boom"', '""'),
    ("trace_id", "0x" + TRACE_ID.hex(), "0x" + "00" * 16),
    ("trace_id", "TraceID(0x" + TRACE_ID.hex() + ")", "TraceID(0x" + "00" * 16 + ")"),
    ("trace_id.string", f'"{TRACE_ID.hex()}"', '""'),
    ("span_id", "SpanID(0x" + SPAN_ID.hex() + ")", "0x0102"),
    ("span_id.string", f'"{SPAN_ID.hex()}"', '"0102030405060709"'),
    ("parent_span_id", "0x" + "09" * 8, "0x" + "00" * 8),
    ("parent_span_id.string", '"' + "09" * 8 + '"', '""'),
    ("trace_state", '"vendor=abc,rojo=00f067"', '""'),
    ('trace_state["rojo"]', '"00f067"', '"abc"'),
    ("start_time_unix_nano", "1000", "5000"),
    ("end_time_unix_nano", "5000", "1000"),
    ("dropped_attributes_count", "3", "0"),
    ("dropped_events_count", "4", "0"),
    ("dropped_links_count", "5", "0"),
    ("flags", "257", "0"),
    ('attributes["code"]', "503", "500"),
    ('attributes["ratio"]', "0.5", "1.5"),
    ('attributes["ok"]', "false", "true"),
    ('attributes["raw"]', "0x0102", "0x0103"),
    ('attributes["nested"]["a"]["b"]', '"deep"', '"shallow"'),
    ('attributes["list"][1]', '"y"', '"x"'),
    ('attributes["list"][-1]', '"y"', '"x"'),
    ('resource.attributes["service.name"]', '"checkout"', '"cart"'),
    ("resource.dropped_attributes_count", "2", "0"),
    ("instrumentation_scope.name", '"io.otel.http"', '""'),
    ("scope.name", '"io.otel.http"', '""'),
    ("instrumentation_scope.version", '"1.2.3"', '"1.2"'),
    ('instrumentation_scope.attributes["lib"]', '"aiohttp"', '"grpc"'),
    ("instrumentation_scope.dropped_attributes_count", "1", "0"),
    ("Len(attributes)", "8", "7"),
]


@pytest.mark.parametrize(("path", "same", "other"), SPAN_PATHS)
def test_span_paths(path: str, same: str, other: str) -> None:
    assert span_is(f"{path} == {same}") is True
    assert span_is(f"{path} == {other}") is False
    assert span_is(f"{path} != {other}") is True


def test_missing_values_are_nil() -> None:
    missing = [
        'attributes["nope"]',
        'attributes["empty"]',
        'attributes["nested"]["x"]',
        'attributes["list"][5]',
    ]
    missing += ['attributes["code"]["x"]', 'trace_state["nope"]', 'resource.attributes["nope"]']
    for path in missing:
        assert span_is(f"{path} == nil") is True, path
        assert span_is(f"{path} != nil") is False, path
    assert span_is('attributes["http.target"] == nil') is False


LOG = LogRecord(
    time_unix_nano=10, observed_time_unix_nano=20, severity_number=SeverityNumber.SEVERITY_NUMBER_ERROR,
    severity_text="ERROR", body=av("disk full"), attributes=kvs({"path": "/var"}), dropped_attributes_count=1,
    flags=1, trace_id=TRACE_ID, span_id=SPAN_ID, event_name="disk.alert",
)  # fmt: skip


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("severity_number == SEVERITY_NUMBER_ERROR", True),
        ("severity_number < SEVERITY_NUMBER_WARN", False),
        ("severity_number >= SEVERITY_NUMBER_WARN", True),
        ('severity_text == "ERROR"', True),
        ('body == "disk full"', True),
        ('IsMatch(body, "full$")', True),
        ("time_unix_nano == 10 and observed_time_unix_nano == 20", True),
        ("flags == 1 and dropped_attributes_count == 1", True),
        (f'trace_id == 0x{TRACE_ID.hex()} and span_id.string == "{SPAN_ID.hex()}"', True),
        ('trace_id.string == "x"', False),
        ('attributes["path"] == "/var" and event_name == "disk.alert"', True),
        ('log.severity_text == "INFO"', False),
    ],
)
def test_log_paths(condition: str, expected: bool) -> None:
    assert compile_condition(condition, "log")(LOG, SCOPE, RESOURCE) is expected


def test_log_body_of_other_types() -> None:
    structured = LogRecord(body=av({"user": {"id": 7}, "tags": ["a"]}))
    assert compile_condition('body["user"]["id"] == 7', "log")(structured, SCOPE, RESOURCE) is True
    assert compile_condition('body["tags"][0] == "a"', "log")(structured, SCOPE, RESOURCE) is True
    assert compile_condition('body == "x" or IsMap(body)', "log")(structured, SCOPE, RESOURCE) is True
    assert compile_condition("body == nil", "log")(LogRecord(), SCOPE, RESOURCE) is True
    assert compile_condition("body == 42", "log")(LogRecord(body=av(42)), SCOPE, RESOURCE) is True


def _metric(kind: str, point: Any, **extra: Any) -> mpb.Metric:
    metric = mpb.Metric(name="http.server.duration", unit="ms", description="latency")
    getattr(metric, kind).data_points.append(point)
    for key, value in extra.items():
        setattr(getattr(metric, kind), key, value)
    return metric


CUMULATIVE = mpb.AGGREGATION_TEMPORALITY_CUMULATIVE
NUMBER = mpb.NumberDataPoint(as_int=7, time_unix_nano=9, start_time_unix_nano=1, attributes=kvs({"le": "10"}))
HIST = mpb.HistogramDataPoint(count=3, sum=1.5, min=0.5, max=1.0, flags=1)
EXPO = mpb.ExponentialHistogramDataPoint(count=4, scale=2, zero_count=1)
SUMMARY = mpb.SummaryDataPoint(count=5, sum=2.5)
POINTS = {
    "number": (NUMBER, _metric("sum", NUMBER, aggregation_temporality=CUMULATIVE, is_monotonic=True)),
    "double": (mpb.NumberDataPoint(as_double=2.5), _metric("gauge", mpb.NumberDataPoint(as_double=2.5))),
    "hist": (HIST, _metric("histogram", HIST, aggregation_temporality=CUMULATIVE)),
    "expo": (EXPO, _metric("exponential_histogram", EXPO)),
    "summary": (SUMMARY, _metric("summary", SUMMARY)),
}


@pytest.mark.parametrize(
    ("point", "condition", "expected"),
    [
        ("number", 'metric.name == "http.server.duration" and attributes["le"] != nil', True),
        ("number", 'metric.unit == "ms" and metric.description == "latency"', True),
        ("number", "metric.type == METRIC_DATA_TYPE_SUM and metric.is_monotonic == true", True),
        ("number", "metric.aggregation_temporality == AGGREGATION_TEMPORALITY_CUMULATIVE", True),
        ("number", "value_int == 7 and value_double == 0.0 and count == nil and sum == nil", True),
        ("number", "time_unix_nano == 9 and start_time_unix_nano == 1", True),
        ("double", "value_double == 2.5 and value_int == 0 and metric.type == METRIC_DATA_TYPE_GAUGE", True),
        ("double", "metric.is_monotonic == true", False),
        ("hist", "metric.type == METRIC_DATA_TYPE_HISTOGRAM and count == 3 and sum == 1.5", True),
        ("hist", "min == 0.5 and max == 1.0 and flags == FLAG_NO_RECORDED_VALUE and value_int == nil", True),
        (
            "expo",
            "metric.type == METRIC_DATA_TYPE_EXPONENTIAL_HISTOGRAM and scale == 2 and zero_count == 1",
            True,
        ),
        ("expo", "sum == nil and min == nil and count == 4", True),
        ("summary", "metric.type == METRIC_DATA_TYPE_SUMMARY and count == 5 and sum == 2.5", True),
        ("summary", "metric.aggregation_temporality == AGGREGATION_TEMPORALITY_UNSPECIFIED", True),
        ("summary", "scale == nil and min == nil", True),
    ],
)
def test_datapoint_paths(point: str, condition: str, expected: bool) -> None:
    item, metric = POINTS[point]
    assert compile_condition(condition, "datapoint")(item, SCOPE, RESOURCE, metric) is expected


def test_metric_context_and_missing_metric() -> None:
    metric = POINTS["hist"][1]
    assert compile_condition("name == \"http.server.duration\" and type == METRIC_DATA_TYPE_HISTOGRAM",
                             "metric")(metric, SCOPE, RESOURCE) is True  # fmt: skip
    assert compile_condition("metric.name == nil", "datapoint")(NUMBER, SCOPE, RESOURCE) is True


# --- comparison semantics -------------------------------------------------------------------------------

LITERALS: dict[str, Any] = {
    "nil": None, "true": True, "false": False, "0": 0, "1": 1, "2": 2, "1.0": 1.0, "2.5": 2.5, "-3": -3,
    '"a"': "a", '"b"': "b", '""': "", '"1"': "1", "0x01": b"\x01", "0x02": b"\x02",
}  # fmt: skip
OPS = ["==", "!=", "<", "<=", ">", ">="]

EXPECTED = [  # (left, op, right, result): the OTTL rules, spelled out
    ("1", "==", "1.0", True), ("1", "<", "2.5", True), ("2.5", ">=", "2", True), ("-3", "<", "1", True),
    ("1", "==", "true", False), ("1", "!=", "true", True), ("true", "==", "true", True),
    ("true", "!=", "false", True), ("true", ">", "false", False), ("false", "<", "true", False),
    ("nil", "==", "nil", True), ("nil", "!=", "1", True), ("nil", "<", "1", False),
    ("nil", "<=", "nil", False), ("1", "==", "nil", False), ('""', "==", "nil", False),
    ('"a"', "<", '"b"', True), ('"b"', "<=", '"a"', False), ('"a"', "==", "1", False),
    ('"a"', "!=", "1", True), ('"a"', "<", "1", False), ('"1"', "==", "1", False),
    ("0x01", "<", "0x02", True), ("0x01", "==", "0x01", True), ("0x01", "==", '"a"', False),
    ("0x01", "<", '"a"', False), ("false", "==", "0", False), ("false", "==", "nil", False),
]  # fmt: skip


def _shapes(left: str, op: str, right: str) -> list[tuple[str, Span]]:
    """The same comparison as literal/literal, path/literal, literal/path and path/path."""
    span = Span(attributes=kvs({"l": LITERALS[left], "r": LITERALS[right]}))
    return [
        (f"{left} {op} {right}", span),
        (f'attributes["l"] {op} {right}', span),
        (f'{left} {op} attributes["r"]', span),
        (f'attributes["l"] {op} attributes["r"]', span),
    ]


@pytest.mark.parametrize(("left", "op", "right", "result"), EXPECTED)
def test_comparison_rules_in_every_shape(left: str, op: str, right: str, result: bool) -> None:
    for condition, span in _shapes(left, op, right):
        assert span_is(condition, span) is result, condition


def test_maps_and_lists_compare_only_for_equality() -> None:
    span = Span(attributes=kvs({"m": {"k": 1}, "m2": {"k": 1}, "l": [1, 2], "l2": [1, 3]}))
    assert span_is('attributes["m"] == attributes["m2"]', span) is True
    assert span_is('attributes["l"] != attributes["l2"]', span) is True
    assert span_is('attributes["l"] < attributes["l2"]', span) is False
    assert span_is('attributes["m"] == "k"', span) is False


@settings(max_examples=300, deadline=None)
@given(a=st.sampled_from(list(LITERALS)), b=st.sampled_from(list(LITERALS)), op=st.sampled_from(OPS))
def test_specialised_comparisons_agree_with_the_generic_one(a: str, b: str, op: str) -> None:
    """Path-vs-literal closures are specialised per literal type; they must match path-vs-path."""
    results = {span_is(condition, span) for condition, span in _shapes(a, op, b)}
    assert len(results) == 1, (a, op, b, results)


# --- converters -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ('IsMatch(name, "^GET /api")', True),
        ('IsMatch(name, "orders")', True),  # unanchored, like Go's MatchString
        ('IsMatch(name, "^POST")', False),
        ('IsMatch(attributes["code"], "503")', False),  # not a string -> false
        ('IsMatch(attributes["nope"], ".*")', False),
        ('IsMatch(name, "^GET \\\\/api")', True),  # \\ in OTTL is one backslash for the regex
        ('HasPrefix(name, "GET ") and HasSuffix(name, "orders")', True),
        ('HasPrefix(attributes["code"], "5") or HasSuffix(name, "GET")', False),
        ('IsString(name) and IsInt(attributes["code"]) and IsDouble(attributes["ratio"])', True),
        ('IsBool(attributes["ok"]) and IsMap(attributes["nested"]) and IsList(attributes["list"])', True),
        ('IsInt(attributes["ok"]) or IsString(attributes["code"]) or IsMap(attributes["list"])', False),
        ('Len(name) == 15 and Len(attributes["list"]) == 2 and Len(attributes["code"]) == nil', True),
        ('Int(attributes["ratio"]) == 0 and Int("42") == 42 and Int("x") == nil and Int(true) == 1', True),
        ('Double(attributes["code"]) == 503.0 and Double("1.5") == 1.5 and Double(nil) == nil', True),
        ('String(attributes["code"]) == "503" and String(attributes["ok"]) == "false"', True),
        ('String(attributes["ratio"]) == "0.5" and String(attributes["raw"]) == "0102"', True),
        ('String(attributes["list"]) == "[\\"x\\",\\"y\\"]"', True),
        ('ToLowerCase(name) == "get /api/orders" and ToUpperCase(status.message) == "BOOM"', True),
        ("IsRootSpan()", False),
    ],
)
def test_converters(condition: str, expected: bool) -> None:
    assert span_is(condition) is expected


def test_is_root_span_and_regex_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    cond = compile_condition('IsRootSpan() and IsMatch(name, "^GET")', "span")

    def no_compiling(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("regex compiled during evaluation")

    monkeypatch.setattr(re, "compile", no_compiling)
    monkeypatch.setattr(re, "_compile", no_compiling)  # what re.search/re.match use under the hood
    assert cond(Span(name="GET /"), SCOPE, RESOURCE) is True
    assert cond(Span(name="GET /", parent_span_id=SPAN_ID), SCOPE, RESOURCE) is False


# --- boolean structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("true or true and false", True),  # and binds tighter than or
        ("(true or true) and false", False),
        ("not false and false", False),  # not binds tighter than and
        ("not (false and false)", True),
        ("not not true", True),
        ('name == "x" or kind == SPAN_KIND_SERVER and status.code == STATUS_CODE_ERROR', True),
        ('(name == "x" or kind == SPAN_KIND_SERVER) and status.code == STATUS_CODE_OK', False),
        ('not name == "x" and not (kind == SPAN_KIND_CLIENT or kind == SPAN_KIND_INTERNAL)', True),
        ('attributes["ok"] == true or attributes["ok"] == false and attributes["code"] > 500', True),
    ],
)
def test_precedence_and_parentheses(condition: str, expected: bool) -> None:
    assert span_is(condition) is expected


ATOMS = [f"b{n}" for n in range(4)]


def _trees(depth: int = 3) -> st.SearchStrategy[tuple[str, str]]:
    """(OTTL text, Python expression) pairs over the boolean attributes b0..b3."""
    leaf = st.sampled_from(ATOMS).map(lambda a: (f'attributes["{a}"] == true', a))
    return st.recursive(
        leaf,
        lambda sub: st.one_of(
            st.tuples(sub, st.sampled_from(["and", "or"]), sub).map(
                lambda t: (f"{t[0][0]} {t[1]} {t[2][0]}", f"{t[0][1]} {t[1]} {t[2][1]}")
            ),
            sub.map(lambda t: (f"not {t[0]}", f"not {t[1]}")),
            sub.map(lambda t: (f"({t[0]})", f"({t[1]})")),
        ),
        max_leaves=8,
    )


@settings(max_examples=200, deadline=None)
@given(tree=_trees(), values=st.tuples(*[st.booleans()] * len(ATOMS)))
def test_random_boolean_trees_evaluate_like_python(tree: tuple[str, str], values: tuple[bool, ...]) -> None:
    text, python = tree
    env = dict(zip(ATOMS, values, strict=True))
    span = Span(attributes=kvs(env))
    assert span_is(text, span) is eval(python, {}, env)  # Python shares OTTL's not > and > or


def test_compile_conditions_is_an_or() -> None:
    cond = compile_conditions(
        ['name == "a"', 'attributes["code"] == 503', "kind == SPAN_KIND_CLIENT"], "span"
    )
    assert cond(SPAN, SCOPE, RESOURCE) is True
    assert cond(Span(name="b"), SCOPE, RESOURCE) is False
    assert compile_conditions([], "span")(SPAN, SCOPE, RESOURCE) is False
    with pytest.raises(OttlError) as caught:
        compile_conditions(['name == "a"', "name =="], "span")
    assert caught.value.index == 1


# --- errors ---------------------------------------------------------------------------------------------

ERRORS = [
    ('attributes["x"] == ', "unexpected end of input at column 19, expected a value "
     "(string, number, bool, nil, path or function call)"),
    ('name == "x" and', "unexpected end of input at column 16, expected a condition "
     "(comparison, true/false, function call, 'not' or '(')"),
    ('name "x"', "unexpected '\"x\"' at column 6, expected a comparison operator (==, !=, <, <=, >, >=), "
     "'and', 'or' or end of input"),
    ("(name == 1", "unexpected end of input at column 11, expected 'and', 'or' or ')'"),
    ("attributes[x] == 1", "unexpected 'x' at column 12, expected a string or integer key"),
    ('name == "abc', "unterminated string starting at column 9"),
    ("name # 1", "unexpected character '#' at column 6, expected a comparison operator "
     "(==, !=, <, <=, >, >=), 'and', 'or' or end of input"),
    ("nme == 1", "unknown path 'nme' for the span context at column 1 (did you mean 'name'?)"),
    ("kind == SPAN_KIND_SERVR", "unknown enum constant 'SPAN_KIND_SERVR' for the span context at column 9 "
     "(did you mean 'SPAN_KIND_SERVER'?)"),
    ("severity_number == 1", "unknown path 'severity_number' for the span context at column 1 "
     "(it is a path of the log context)"),
    ("kind == SEVERITY_NUMBER_WARN", "unknown enum constant 'SEVERITY_NUMBER_WARN' for the span context at "
     "column 9 (it is an enum of the log context)"),
    ("foo == 1", "unknown path 'foo' for the span context at column 1; known paths: attributes[\"...\"], "
     "instrumentation_scope.attributes[\"...\"], resource.attributes[\"...\"], trace_state[\"...\"], "
     "dropped_attributes_count, dropped_events_count, dropped_links_count, end_time_unix_nano, flags, "
     "instrumentation_scope.dropped_attributes_count, instrumentation_scope.name, "
     "instrumentation_scope.version, "
     "kind, name, parent_span_id, parent_span_id.string, resource.dropped_attributes_count, span_id, "
     "span_id.string, start_time_unix_nano, status.code, status.message, trace_id, trace_id.string, "
     "trace_state"),
    ('IsMatch(name)', "IsMatch takes 2 arguments (target, pattern), got 1 at column 1"),
    ('IsRootSpan(name)', "IsRootSpan takes no arguments, got 1 at column 1"),
    ('IsMatch(name, "(")', "invalid regular expression in IsMatch at column 15: "
     "missing ), unterminated subpattern at position 0"),
    ("IsMatch(name, name)", "the pattern of IsMatch must be a string literal, at column 15"),
    ("Foo(name) == 1", "unknown function 'Foo' at column 1; known functions: IsMatch, HasPrefix, HasSuffix, "
     "IsString, IsInt, IsDouble, IsBool, IsMap, IsList, IsRootSpan, Len, Int, Double, String, ToLowerCase, "
     "ToUpperCase, TraceID, SpanID"),
    ("name", "path 'name' is not a condition by itself at column 1; compare it with ==, !=, <, <=, > or >="),
    ("Len(name)", "Len(...) returns a value, not a boolean, at column 1; "
     "compare it with ==, !=, <, <=, > or >="),
    ('IsMatch(name, "^\\d")', "invalid escape '\\d' in string at column 17 "
     "(write \\\\d for a literal backslash, e.g. in a regex)"),
    ("trace_id == 0x123", "bytes literal 0x123 at column 13 has an odd number of hex digits"),
    ("name.x == 1", "unknown path 'name.x' for the span context at column 1 (did you mean 'name'?)"),
    ('name["k"] == 1', "path 'name' cannot be indexed at column 1"),
    ("attributes[0] == 1", "'attributes' is a map and takes a string key, not [0], at column 1"),
    ("trace_id == TraceID(0x01)", f"TraceID takes a 16-byte literal such as 0x{'01' * 16}, at column 21"),
    ("", "the condition is empty"),
    ('name == "a" and\n  kind ==', "unexpected end of input at line 2, column 10, expected a value "
     "(string, number, bool, nil, path or function call)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "reason"), ERRORS)
def test_error_messages(text: str, reason: str) -> None:
    assert error_of(text) == f"invalid OTTL condition '{text}': {reason}"


def test_errors_carry_line_and_column_and_are_value_errors() -> None:
    with pytest.raises(ValueError) as caught:
        compile_condition('name == "a" and\n  kind ==', "span")
    assert isinstance(caught.value, OttlError)
    assert (caught.value.line, caught.value.column) == (2, 10)


def test_paths_and_functions_are_checked_per_context() -> None:
    assert error_of('name == "x"', "log") == (
        "invalid OTTL condition 'name == \"x\"': unknown path 'name' for the log context at column 1 "
        "(it is a path of the span and metric contexts)"
    )
    assert error_of("metric.nme == 1", "datapoint") == (
        "invalid OTTL condition 'metric.nme == 1': unknown path 'metric.nme' for the datapoint context "
        "at column 1 (did you mean 'metric.name'?)"
    )
    assert error_of("IsRootSpan()", "log") == (
        "invalid OTTL condition 'IsRootSpan()': IsRootSpan is only available in the span context, at column 1"
    )
    assert error_of("severity_number > SEVERITY_NUMBER_INFO", "span").startswith(
        "invalid OTTL condition 'severity_number > SEVERITY_NUMBER_INFO': unknown path 'severity_number'"
    )
    with pytest.raises(ValueError, match="unknown OTTL context 'trace'"):
        compile_condition("true", "trace")  # type: ignore[arg-type]


def test_every_severity_number_enum_is_known() -> None:
    for name, number in SeverityNumber.items():
        record = LogRecord(severity_number=number)  # type: ignore[arg-type]
        assert compile_condition(f"severity_number == {name}", "log")(record, SCOPE, RESOURCE) is True
