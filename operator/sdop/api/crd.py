"""Generate the CustomResourceDefinition from the pydantic models.

Pydantic writes JSON Schema with ``$ref``s, ``anyOf`` for optionals and ``const`` for
single literals; a CRD needs a structural OpenAPI v3 schema: everything inlined, one
type per node, defaults that the API server can apply. This module does that conversion
and nothing else, so ``crds/`` is always a build product of ``sdop.api.spec``.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from .base import ApiModel
from .resource import CATEGORIES, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from .spec import StableDiffusionServiceSpec
from .status import StableDiffusionServiceStatus

_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "multipleOf",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "format",
    "nullable",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-map-type",
}


def _field_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Defaults that pydantic leaves out of its schema: those from default_factory."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if field.default_factory is None:
            continue
        value = field.default_factory()  # type: ignore[call-arg]  # every factory here takes no argument
        alias = field.alias or name
        if isinstance(value, BaseModel):
            out[alias] = {}  # lets the API server apply the nested defaults
        elif isinstance(value, list):
            out[alias] = [v.wire() if isinstance(v, ApiModel) else v for v in value]
        else:
            out[alias] = value
    return out


def _models_by_name(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    seen: dict[str, type[BaseModel]] = {}

    def walk(m: type[BaseModel]) -> None:
        if m.__name__ in seen:
            return
        seen[m.__name__] = m
        for f in m.model_fields.values():
            for t in _types_in(f.annotation):
                walk(t)

    walk(root)
    return seen


def _types_in(annotation: Any) -> list[type[BaseModel]]:
    out = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        out.append(annotation)
    for arg in getattr(annotation, "__args__", ()) or ():
        out.extend(_types_in(arg))
    return out


def structural(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of a model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    models = _models_by_name(model)

    def convert(node: dict[str, Any], model_name: str | None = None) -> dict[str, Any]:
        node = copy.deepcopy(node)
        if "$ref" in node:
            name = node.pop("$ref").split("/")[-1]
            target = convert(defs[name], name)
            if "description" in node:
                target["description"] = node["description"]
            if "default" in node and node["default"] is not None:
                target["default"] = node["default"]
            return target
        if "anyOf" in node:
            options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot make a structural schema of anyOf {options}")
            inner = convert(options[0])
            for k in ("description", "default"):
                if k in node and node[k] is not None:
                    inner[k] = node[k]
            return inner
        if "const" in node:
            node["enum"] = [node.pop("const")]
        if node.get("default", 0) is None:
            node.pop("default")
        if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
            node["minimum"] = node.pop("exclusiveMinimum")
            node["exclusiveMinimum"] = True
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k not in _KEEP:
                continue
            if k == "properties":
                v = {pk: convert(pv) for pk, pv in v.items()}
            elif k == "items":
                v = convert(v)
            elif k == "additionalProperties":
                if v is False:
                    continue  # structural schemas prune unknown fields; strict validation rejects them
                if v is True:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                    continue
                v = convert(v)
            out[k] = v
        if out.get("x-kubernetes-preserve-unknown-fields"):
            out["type"] = "object"
        if model_name and model_name in models and "properties" in out:
            for alias, default in _field_defaults(models[model_name]).items():
                out["properties"][alias].setdefault("default", default)
        return out

    schema = convert(raw, model.__name__)
    for alias, default in _field_defaults(model).items():
        schema["properties"][alias].setdefault("default", default)
    return schema


def crd() -> dict[str, Any]:
    spec_schema = structural(StableDiffusionServiceSpec)
    status_schema = structural(StableDiffusionServiceStatus)
    status_schema["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    status_schema["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    root = {
        "type": "object",
        "description": "StableDiffusionService runs a Stable Diffusion model as an autoscaled, monitored HTTP image "
        "API on GPU nodes.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [
            {
                # The Service takes the CR's name: it must be a DNS-1035 label. Longer child
                # names are cut to fit with a hash (sdop.render.context.fit).
                "rule": "self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                "message": "metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', "
                "starting with a letter, at most 63 characters): the Service takes this name",
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "sdop", "app.kubernetes.io/part-of": "sdop"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {
                            "name": "Replicas",
                            "type": "integer",
                            "jsonPath": ".status.readyReplicas",
                            "description": "Ready replicas",
                        },
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.id"},
                        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def crd_yaml() -> str:
    return "# Generated by `sdop crd` from operator/sdop/api; do not edit.\n" + yaml.safe_dump(
        crd(), sort_keys=False, width=120
    )
