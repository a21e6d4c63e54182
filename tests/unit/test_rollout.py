"""Canary rendering and the rollback plan: pure functions of the CR and its status."""

from __future__ import annotations

import copy

import pytest

from sdop.api import SpecError, parse
from sdop.api.crd import crd
from sdop.render import ClusterFacts, render
from sdop.render.rollout import fingerprint, plan
from sdtesting.apiserver.crdschema import validate
from sdtesting.examples import by_kind, example

from .test_third_party_schemas import crd_for

NAME = "sd15-rollout"
TRACK = "sdop.io/track"


def canary_cr(**spec) -> dict:
    cr = example("canary-gateway")
    cr["spec"].update(spec)
    return cr


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(objs, name):
    return objs[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]


def env(objs, name):
    return objs[("ConfigMap", name)]["data"]


def with_status(cr: dict, **status) -> dict:
    out = copy.deepcopy(cr)
    out["status"] = status
    return out


def test_a_canary_is_a_second_deployment_with_its_own_model_sharing_the_cache():
    cr = example("canary-gateway")
    cr["spec"]["model"]["cache"] = {"enabled": True, "size": "40Gi"}
    objs = by_kind(render(cr))
    stable, canary = pod_labels(objs, NAME), pod_labels(objs, f"{NAME}-canary")
    assert stable[TRACK] == "stable" and canary[TRACK] == "canary"
    assert stable["sdop.io/model-revision"] == "main"
    assert canary["sdop.io/model-revision"] == "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
    assert env(objs, f"{NAME}-config")["SDSERVE_MODEL_REVISION"] == "main"
    assert env(objs, f"{NAME}-canary-config")["SDSERVE_MODEL_REVISION"].startswith("451f4fe")
    dep = objs[("Deployment", f"{NAME}-canary")]
    assert dep["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"configMapRef": {"name": f"{NAME}-canary-config"}}
    ]
    assert dep["spec"]["replicas"] == 1  # not autoscaled
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for o in (dep, objs[("Deployment", NAME)])
        for v in o["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert len(claims) == 1 and [k for k in objs if k[0] == "PersistentVolumeClaim"] == [
        ("PersistentVolumeClaim", claims.pop())
    ]
    # Each Deployment's selector matches only its own pods... except the stable one, whose
    # selector is immutable and older than canaries: it matches both, and owner references keep them apart.
    assert matches(dep["spec"]["selector"]["matchLabels"], canary)
    assert not matches(dep["spec"]["selector"]["matchLabels"], stable)
    # The main Service and the NetworkPolicy cover both tracks; the route Services one each.
    for kind in ("Service",):
        sel = objs[(kind, NAME)]["spec"]["selector"]
        assert matches(sel, stable) and matches(sel, canary)
    assert matches(objs[("NetworkPolicy", NAME)]["spec"]["podSelector"]["matchLabels"], canary)
    for track, labels, other in (("stable", stable, canary), ("canary", canary, stable)):
        sel = objs[("Service", f"{NAME}-{track}")]["spec"]["selector"]
        assert matches(sel, labels) and not matches(sel, other)


def test_a_canary_of_another_model_answers_to_the_stable_models_name_too():
    """Clients that name the model (the Images API's ``model``) know the stable one: the share
    of their requests the canary gets must not be 404 there. A canary of another revision of
    the same id needs no alias; the stable replicas never get one."""
    same = by_kind(render(example("canary-gateway")))
    assert "SDSERVE_MODEL_ALIASES" not in env(same, f"{NAME}-canary-config")
    cr = example("canary-gateway")
    cr["spec"]["canary"]["model"] = {"id": "acme/sd15-finetune", "revision": "v2"}
    other = by_kind(render(cr))
    canary = env(other, f"{NAME}-canary-config")
    assert canary["SDSERVE_MODEL"] == "acme/sd15-finetune"
    assert canary["SDSERVE_MODEL_ALIASES"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "SDSERVE_MODEL_ALIASES" not in env(other, f"{NAME}-config")
    assert env(other, f"{NAME}-config") == env(same, f"{NAME}-config")


def test_a_canary_takes_up_no_jobs_the_stable_replicas_hand_off():
    """Jobs accepted by the stable model stay on it when a stable replica shuts down or dies:
    the canary serves its share of the traffic, not the stable track's backlog."""
    objs = by_kind(render(example("canary-gateway")))
    assert env(objs, f"{NAME}-canary-config")["SDSERVE_JOB_ADOPT"] == "false"
    assert "SDSERVE_JOB_ADOPT" not in env(objs, f"{NAME}-config")  # the default: take them up


def test_the_route_gives_the_canary_its_weight_only_once_it_serves():
    cr = example("canary-gateway")
    route = by_kind(render(cr))[("HTTPRoute", NAME)]
    assert [b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]] == [100, 0]
    fp = fingerprint(parse(cr).spec.canary.model)
    serving = {"model": "m", "fingerprint": fp, "phase": "Serving", "traffic": "gateway", "weight": 10}
    route = by_kind(render(with_status(cr, canary=serving)))[("HTTPRoute", NAME)]
    assert [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]] == [
        (f"{NAME}-stable", 90),
        (f"{NAME}-canary", 10),
    ]
    assert validate(crd_for(route), route) == []
    # Status about another canary model does not count.
    other = with_status(cr, canary={**serving, "fingerprint": "0" * 16})
    assert by_kind(render(other))[("HTTPRoute", NAME)]["spec"]["rules"][0]["backendRefs"][1]["weight"] == 0


def test_without_the_gateway_api_the_split_is_by_replicas():
    cr = example("canary-gateway")
    facts = ClusterFacts(optional_apis=frozenset())
    objs = by_kind(render(cr, facts))
    assert not [k for k in objs if k[0] == "HTTPRoute"]
    assert ("Service", f"{NAME}-canary") not in objs and ("Service", f"{NAME}-stable") not in objs
    assert objs[("Deployment", f"{NAME}-canary")]["spec"]["replicas"] == 1
    cr["spec"]["canary"]["weight"] = 0  # no traffic: no replicas
    assert by_kind(render(cr, facts))[("Deployment", f"{NAME}-canary")]["spec"]["replicas"] == 0
    cr["spec"].pop("gateway")
    assert by_kind(render(cr))[("Deployment", f"{NAME}-canary")]["spec"]["replicas"] == 0


def test_a_failed_model_renders_the_last_good_one():
    cr = example("canary-gateway")
    cr["spec"].pop("canary")
    spec = parse(cr).spec
    good = copy.deepcopy(spec.model.wire())
    good["revision"] = "v1"
    failed = {
        "fingerprint": fingerprint(spec.model),
        "model": "x",
        "track": "stable",
        "reason": "ModelLoadFailed",
        "time": "2026-11-25T00:00:00Z",
    }
    good_fp = fingerprint(parse({**cr, "spec": {**cr["spec"], "model": good}}).spec.model)
    rolled = with_status(cr, model={"lastGood": good, "lastGoodFingerprint": good_fp, "failed": [failed]})
    p = plan(parse(rolled))
    assert p.rolled_back is not None and p.stable.revision == "v1"
    assert env(by_kind(render(rolled)), f"{NAME}-config")["SDSERVE_MODEL_REVISION"] == "v1"
    # Without a last good model there is nothing to return to: spec.model is rendered.
    bare = with_status(cr, model={"failed": [failed]})
    assert env(by_kind(render(bare)), f"{NAME}-config")["SDSERVE_MODEL_REVISION"] == "main"


def test_a_failed_canary_is_kept_out():
    cr = example("canary-gateway")
    fp = fingerprint(parse(cr).spec.canary.model)
    failed = {"fingerprint": fp, "model": "x", "track": "canary", "reason": "ModelLoadFailed", "time": "t"}
    objs = by_kind(render(with_status(cr, model={"failed": [failed]})))
    assert not [k for k in objs if "canary" in k[1]]
    assert [b["name"] for b in objs[("HTTPRoute", NAME)]["spec"]["rules"][0]["backendRefs"]] == [NAME]


def test_an_unreadable_status_is_ignored_not_fatal():
    cr = with_status(example("canary-gateway"), model={"failed": "not a list"})
    assert plan(parse(cr)).canary is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [("canary", {"model": {"id": "tiny"}}), ("gateway", {"parentRefs": [{"name": "gw"}]})],
)
def test_canary_and_gateway_cannot_combine_with_scale_to_zero(field, value):
    cr = example("keda-scale-to-zero")
    cr["spec"][field] = value
    errors = validate(crd(), cr)
    assert any(f"spec.{field} cannot be combined" in e for e in errors), errors
    with pytest.raises(SpecError, match=f"spec.{field} cannot be combined"):
        parse(cr)
