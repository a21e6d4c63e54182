"""Validate a CR against the CRD's openAPIV3Schema the way the API server does.

jsonschema checks types, bounds, enums and patterns; unknown fields are rejected as
`kubectl apply` (server-side strict field validation) does; the CEL rules
(x-kubernetes-validations) are evaluated with cel-python. Defaults are applied first,
like the API server's defaulting.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema


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


_env = celpy.Environment()


def _cel(schema: dict[str, Any], obj: Any, path: str, errors: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        prog = _env.program(_env.compile(rule["rule"]))
        ok = prog.evaluate({"self": celpy.json_to_cel(obj)})
        if not bool(ok):
            errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(obj, dict):
        for k, sub in schema.get("properties", {}).items():
            if k in obj:
                _cel(sub, obj[k], f"{path}.{k}", errors)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, x in enumerate(obj):
            _cel(schema["items"], x, f"{path}[{i}]", errors)


def validate(crd: dict[str, Any], cr: dict[str, Any]) -> list[str]:
    """Errors as 'path: message'; empty when the API server would accept the CR."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    cr = apply_defaults(schema, cr)
    validator = jsonschema.Draft202012Validator(_strict(schema))
    errors = []
    for e in validator.iter_errors(cr):
        path = ".".join(str(p) for p in e.absolute_path)
        errors.append(f"{path}: {e.message}")
    if not errors:
        _cel(schema, cr, "", errors)
    return errors
