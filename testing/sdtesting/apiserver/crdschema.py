"""Validate a custom resource against its CRD's openAPIV3Schema the way the API server does.

Defaults from the schema are applied first (the API server's defaulting). jsonschema checks
types, bounds, enums and patterns. Unknown fields are pruned, or rejected with
``fieldValidation=Strict`` (what ``kubectl apply`` sends by default). The CEL rules
(x-kubernetes-validations) are evaluated with cel-python.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import celpy
import jsonschema

from . import rules


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    s = copy.deepcopy(schema)
    if s.get("type") == "object" and "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s.setdefault("additionalProperties", False)
    for k, v in list(s.get("properties", {}).items()):
        s["properties"][k] = _strict(v)
    if isinstance(s.get("items"), dict):
        s["items"] = _strict(s["items"])
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _strict(s["additionalProperties"])
    # OpenAPI v3.0 boolean exclusiveMinimum -> JSON Schema number.
    if s.get("exclusiveMinimum") is True:
        s["exclusiveMinimum"] = s.pop("minimum")
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    return s


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    if not isinstance(obj, dict) or "properties" not in schema:
        if isinstance(obj, list) and isinstance(schema.get("items"), dict):
            return [apply_defaults(schema["items"], x) for x in obj]
        return obj
    out = dict(obj)
    for k, sub in schema["properties"].items():
        if k not in out and "default" in sub:
            out[k] = copy.deepcopy(sub["default"])
        if k in out:
            out[k] = apply_defaults(sub, out[k])
    return out


def prune(schema: dict[str, Any], obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """Drop the fields the schema does not know (what the API server does without Strict)."""
    dropped: list[str] = []
    if isinstance(obj, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        out = {}
        for k, v in obj.items():
            if props is not None and k in props:
                out[k], more = prune(props[k], v, f"{path}.{k}")
                dropped += more
            elif isinstance(extra, dict):
                out[k], more = prune(extra, v, f"{path}.{k}")
                dropped += more
            elif props is None and extra is None:
                out[k] = v
            else:
                dropped.append(f"{path}.{k}".lstrip("."))
        return out, dropped
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        items = [prune(schema["items"], x, f"{path}[{i}]") for i, x in enumerate(obj)]
        return [x for x, _ in items], [d for _, more in items for d in more]
    return obj, dropped


_env = celpy.Environment()


@functools.cache
def _program(rule: str) -> Any:
    return _env.program(_env.compile(rule))


def _cel(schema: dict[str, Any], obj: Any, path: str, errors: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        ok = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(obj)})
        if not bool(ok):
            errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(obj, dict):
        for k, sub in schema.get("properties", {}).items():
            if k in obj:
                _cel(sub, obj[k], f"{path}.{k}", errors)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, x in enumerate(obj):
            _cel(schema["items"], x, f"{path}[{i}]", errors)


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _errors(schema: dict[str, Any], validator: jsonschema.protocols.Validator, cr: dict[str, Any]) -> list[str]:
    cr = apply_defaults(schema, cr)
    errors = []
    for e in validator.iter_errors(cr):
        path = ".".join(str(p) for p in e.absolute_path)
        errors.append(f"{path}: {e.message}")
    if not errors:
        _cel(schema, cr, "", errors)
    return errors


def validate(crd: dict[str, Any], cr: dict[str, Any]) -> list[str]:
    """Errors as 'path: message' with unknown fields rejected; empty when the API server would accept the CR."""
    schema = _schema(crd)
    return _errors(schema, jsonschema.Draft202012Validator(_strict(schema)), cr)


class CustomResource:
    """The API server's handling of one served custom resource."""

    def __init__(self, crd: dict[str, Any]):
        self.crd = crd
        self.schema = _schema(crd)
        self.validator = jsonschema.Draft202012Validator(_strict(self.schema))

    def admit(self, obj: dict[str, Any], *, strict: bool) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """(defaulted and pruned object, errors as (field, message))."""
        errors = rules.validate_meta(obj)
        body = {k: v for k, v in obj.items() if k != "metadata"}
        pruned, dropped = prune(self.schema, body)
        if strict and dropped:
            errors += [(d, "Invalid value: unknown field") for d in dropped]
        out = {**apply_defaults(self.schema, pruned), "metadata": obj["metadata"]}
        for message in _errors(
            self.schema, self.validator, {**out, "metadata": {"name": obj["metadata"].get("name", "")}}
        ):
            field, _, text = message.partition(": ")
            errors.append((field.lstrip("."), text))
        return out, errors
