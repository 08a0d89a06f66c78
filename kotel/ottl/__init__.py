"""OTTL boolean conditions (the Collector's filter/tail-sampling vocabulary) compiled to closures.
``compile_condition('attributes["http.target"] == "/health"', "span")`` gives a callable
``cond(span, scope, resource) -> bool``; datapoint conditions also take the Metric as a fourth argument.
"""

from kotel.ottl.compile import Condition, Context, compile_condition, compile_conditions
from kotel.ottl.parser import OttlError
from kotel.ottl.paths import CONTEXTS

__all__ = ["CONTEXTS", "Condition", "Context", "OttlError", "compile_condition", "compile_conditions"]
