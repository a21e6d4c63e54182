"""The CRD is generated from the models, and the API server's checks match the operator's."""

from __future__ import annotations

import pytest

from sdop.api import SpecError, parse
from sdop.api.crd import crd, crd_yaml
from sdtesting.apiserver.crdschema import validate
from sdtesting.examples import CRD_FILE, EXAMPLES, example, load_yaml


def test_committed_crd_is_the_generated_one():
    assert CRD_FILE.read_text() == crd_yaml(), (
        "crds/ is stale: run `sdop crd > crds/stablediffusionservices.sdop.io.yaml`"
    )


def test_chart_crd_is_the_generated_one():
    chart_crd = CRD_FILE.parent.parent / "charts" / "sdop" / "crds" / CRD_FILE.name
    assert chart_crd.read_text() == crd_yaml(), "charts/sdop/crds is stale: run `make crd`"


def _walk(schema, path=""):
    yield path, schema
    for k, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{k}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


def test_every_spec_field_has_a_description_for_kubectl_explain():
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = [p for p, s in _walk(spec) if p and not p.endswith("[]") and not s.get("description")]
    assert missing == []


def test_schema_is_structural_no_refs_no_anyof():
    text = crd_yaml()
    for word in ("$ref", "anyOf", "oneOf", "allOf", "const:", "title:"):
        assert word not in text, word


def test_printer_columns_and_names():
    v = crd()["spec"]["versions"][0]
    assert [c["name"] for c in v["additionalPrinterColumns"]] == ["Ready", "Replicas", "Model", "Endpoint", "Age"]
    assert crd()["spec"]["names"]["shortNames"] == ["sds"]
    assert v["subresources"] == {"status": {}}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_by_crd_schema_and_models(path):
    cr = load_yaml(path)
    assert validate(crd(), cr) == []
    parse(cr)


def _set(obj, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        obj = obj.setdefault(k, {})
    obj[keys[-1]] = value


INVALID = [
    # (name, edit path, value, field the error names)
    ("bad enum", "spec.gpu.type", "v100-16gb", "gpu.type"),
    ("negative replicas", "spec.replicas.min", -1, "replicas.min"),
    ("min above max", "spec.replicas", {"min": 5, "max": 2}, "replicas.min"),
    ("unknown field", "spec.gpu.flavour", "fast", "flavour"),
    ("width not a multiple of 8", "spec.limits.maxWidth", 1001, "maxWidth"),
    ("two model sources", "spec.model.path", "/models/sd", "model"),
    ("scale to zero without keda", "spec.autoscaling", {"provider": "hpa", "scaleToZero": True}, "scaleToZero"),
    ("redis cache without redis", "spec.cache", {"type": "redis"}, "cache.redis"),
    ("ingress without host", "spec.ingress", {"enabled": True}, "ingress.host"),
    ("jwt without key", "spec.auth.jwt", {"issuer": "i", "audience": "a"}, "jwt"),
    ("canary weight above 100", "spec.canary", {"model": {"id": "tiny"}, "weight": 101}, "weight"),
    ("canary with two sources", "spec.canary", {"model": {"id": "tiny", "path": "/m"}}, "model"),
    ("gateway without parents", "spec.gateway", {"parentRefs": []}, "parentRefs"),
    (
        "two loras with one name",
        "spec.model.loras",
        [{"name": "a", "id": "org/one"}, {"name": "a", "path": "/l.safetensors"}],
        "loras",
    ),
    ("lora with two sources", "spec.model.loras", [{"name": "a", "id": "org/one", "path": "/l"}], "loras"),
    ("webhook host with a path", "spec.webhooks.allowedHosts", ["hooks.example.com/x"], "allowedHosts"),
    ("compile mode without compile", "spec.server.compileMode", "reduce-overhead", "compileMode"),
    ("unknown compile mode", "spec.server", {"compile": True, "compileMode": "fastest"}, "compileMode"),
    ("warm-up size over the limits", "spec.server.warmupSizes", [{"width": 2048, "height": 512}], "warmupSizes"),
    ("warm-up size not a multiple of 8", "spec.server.warmupSizes", [{"width": 700, "height": 512}], "width"),
    ("default size over the limits", "spec.defaults.size", {"width": 2048, "height": 512}, "defaults.size"),
    ("default steps over the limit", "spec.defaults", {"steps": 80}, "defaults.steps"),
    ("negative default guidance", "spec.defaults.guidanceScale", -1, "guidanceScale"),
    ("default negative prompt over the limit", "spec.defaults", {"negativePrompt": "x" * 1001}, "negativePrompt"),
    (
        "s3 access key without its secret",
        "spec.outputs.s3",
        {"bucket": "images", "accessKeyIdSecretRef": {"name": "s", "key": "id"}},
        "accessKeyIdSecretRef",
    ),
    ("trusted proxy not an address", "spec.rateLimit.trustedProxies", ["ingress-nginx"], "trustedProxies"),
    ("s3 endpoint not a URL", "spec.outputs.s3", {"bucket": "images", "endpoint": "minio:9000"}, "endpoint"),
    (
        "bad gateway hostname",
        "spec.gateway",
        {"parentRefs": [{"name": "gw"}], "hostnames": ["Not A Host"]},
        "hostnames",
    ),
]


@pytest.mark.parametrize("name,path,value,field", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_cr_rejected_by_crd_and_models_naming_the_field(name, path, value, field):
    cr = example("minimal")
    _set(cr, path, value)
    errors = validate(crd(), cr)
    assert errors, f"CRD schema accepted {name}"
    assert any(field.split(".")[-1] in e for e in errors), errors
    with pytest.raises(SpecError) as exc:
        parse(cr)
    assert field.split(".")[-1] in str(exc.value), str(exc.value)


@pytest.mark.parametrize("address", ["999.0.0.1", "10.0.0.0/40", "1:2:3"])
def test_a_trusted_proxy_the_crd_pattern_lets_through_is_refused_by_the_model(address):
    """The CRD's pattern only screens the characters; the operator names a bad address."""
    cr = example("minimal")
    _set(cr, "spec.rateLimit.trustedProxies", ["10.0.0.0/8", address])
    assert not validate(crd(), cr)
    with pytest.raises(SpecError, match=r"trustedProxies\[1\]"):
        parse(cr)


def test_defaults_in_crd_match_model_defaults():
    """The API server's defaulting and pydantic's give the same spec."""
    from sdtesting.apiserver.crdschema import apply_defaults

    cr = example("minimal")
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    defaulted = apply_defaults(schema, cr)["spec"]
    model = parse(cr).spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert defaulted == model
