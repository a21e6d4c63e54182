"""Shared base for every API model: camelCase on the wire, unknown fields rejected."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base of all CR models.

    Field names are snake_case in Python and camelCase in YAML, like every Kubernetes API.
    Unknown fields are errors, matching a structural CRD schema without
    ``x-kubernetes-preserve-unknown-fields``.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        # The API server does not coerce: "1" is not an integer, "yes" is not a boolean.
        strict=True,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it appears in YAML: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(*rules: tuple[str, str, str | None]) -> dict[str, Any]:
    """Schema extra carrying CEL rules: (rule, message, fieldPath or None)."""
    out = []
    for rule, message, field_path in rules:
        item = {"rule": rule, "message": message}
        if field_path:
            item["fieldPath"] = field_path
        out.append(item)
    return {"x-kubernetes-validations": out}
