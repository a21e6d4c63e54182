"""Rendered third-party objects validate against their upstream CRDs (testing/upstream-crds):
types, enums, required fields, CEL rules, and unknown fields rejected."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from sdop.api import MANAGED
from sdop.render import render
from sdtesting.apiserver.crdschema import validate
from sdtesting.examples import EXAMPLES, ROOT, example, load_yaml

UPSTREAM = ROOT / "testing" / "upstream-crds"


def _crds() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(UPSTREAM.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[doc["spec"]["names"]["kind"]] = doc
    return out


CRDS = _crds()


def crd_for(obj: dict[str, Any]) -> dict[str, Any]:
    crd = CRDS[obj["kind"]]
    group, _, version = obj["apiVersion"].rpartition("/")
    assert group == crd["spec"]["group"], obj["apiVersion"]
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served", True)]
    assert served, f"{obj['kind']} {obj['apiVersion']} is not a served version of the upstream CRD"
    return {**crd, "spec": {**crd["spec"], "versions": served}}


def variants() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in EXAMPLES:
        cr = load_yaml(path)
        if cr.get("kind") == "StableDiffusionService" and any(o["kind"] in CRDS for o in render(cr)):
            out.append((path.stem, cr))
    keda = example("sd15-production")
    keda["spec"]["autoscaling"] = {"provider": "keda", "scaleDownStabilizationSeconds": 900}
    out.append(("keda-above-zero", keda))
    return out


def third_party(cr: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        o for o in render(cr) if "." in o["apiVersion"].split("/")[0] and not o["apiVersion"].endswith(".k8s.io/v1")
    ]


def test_every_third_party_kind_has_its_upstream_crd():
    kinds = {row.kind for row in MANAGED if row.optional_api}
    assert kinds <= set(CRDS), kinds - set(CRDS)


@pytest.mark.parametrize(("name", "cr"), variants(), ids=[n for n, _ in variants()])
def test_rendered_third_party_objects_match_the_upstream_schema(name, cr):
    for obj in [o for o in render(cr) if o["kind"] in CRDS]:
        errors = validate(crd_for(obj), obj)
        assert errors == [], (obj["kind"], errors)


def test_the_schema_check_bites():
    obj = next(o for o in render(example("keda-scale-to-zero")) if o["kind"] == "HTTPScaledObject")
    broken = copy.deepcopy(obj)
    broken["spec"]["scaleDownPeriod"] = 5  # the field is scaledownPeriod
    assert validate(crd_for(broken), broken)
    wrong_type = copy.deepcopy(obj)
    wrong_type["spec"]["replicas"]["max"] = "3"
    assert validate(crd_for(wrong_type), wrong_type)
