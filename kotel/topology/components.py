"""Collector-style component maps (``type[/name]: {options}``) validated per type, keeping key paths."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails

from kotel.topology.base import component_type


def prefixed(exc: ValidationError, prefix: tuple[str | int, ...]) -> list[InitErrorDetails]:
    """The errors of a nested validation, re-rooted under ``prefix`` so the user sees the whole path."""
    out: list[InitErrorDetails] = []
    for err in exc.errors():
        detail: InitErrorDetails = {"type": err["type"], "loc": (*prefix, *err["loc"]), "input": err["input"]}
        if "ctx" in err:
            detail["ctx"] = err["ctx"]
        out.append(detail)
    return out


def validate_components(value: Any, registry: dict[str, type[BaseModel]], kind: str) -> dict[str, BaseModel]:
    """Validate each entry with the model of its type; every error keeps its ``<key>.<option>`` path."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of {kind} names to their options")
    out: dict[str, BaseModel] = {}
    errors: list[InitErrorDetails] = []
    for name, options in value.items():
        ctype = component_type(str(name))
        model = registry.get(ctype)
        if model is None:
            errors.append(
                {
                    "type": "value_error",
                    "loc": (name,),
                    "input": options,
                    "ctx": {"error": ValueError(
                        f"unknown {kind} type {ctype!r}; expected one of: {', '.join(sorted(registry))}"
                    )},
                }
            )
            continue
        try:
            out[name] = model.model_validate(options if options is not None else {})
        except ValidationError as exc:
            errors.extend(prefixed(exc, (name,)))
    if errors:
        raise ValidationError.from_exception_data(kind, errors)
    return out
