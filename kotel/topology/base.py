"""The base every topology model shares: frozen, and strict about unknown keys."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Percentage = Annotated[float, Field(ge=0, le=100)]
# Kafka topic names allow [a-zA-Z0-9._-]; tenants become part of topic names.
TenantName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,100}$")]
TENANT_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def component_type(name: str) -> str:
    """``otlp/tenant-a`` -> ``otlp``: the Collector's ``type[/name]`` component ids."""
    return name.split("/", 1)[0]
