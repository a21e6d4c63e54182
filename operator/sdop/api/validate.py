"""The operator's whole check of a CR: the schema (pydantic) and the rules it cannot express."""

from __future__ import annotations

from typing import Any

from .resource import SpecError, StableDiffusionService, parse
from .semantics import problems


def load(obj: dict[str, Any] | StableDiffusionService) -> StableDiffusionService:
    """Parse a CR and apply the rules the CRD schema cannot express; SpecError names the fields."""
    cr = obj if isinstance(obj, StableDiffusionService) else parse(obj)
    found = problems(cr.spec)
    if found:
        raise SpecError(found)
    return cr
