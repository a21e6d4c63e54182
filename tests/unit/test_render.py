"""render(cr) is pure, deterministic, valid Kubernetes, and each field touches only its objects."""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest
import yaml

from sdop.api import MANAGED, SpecError
from sdop.render import ClusterFacts, render
from sdtesting.examples import EXAMPLES, K8S_VERSIONS, by_kind, example, load_yaml

# Third-party kinds: validated against their upstream CRDs in test_third_party_schemas.py.
CRD_KINDS = {row.kind for row in MANAGED if row.optional_api}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_rendered_objects_validate_against_kubernetes_schemas(path, version):
    objs = render(load_yaml(path))
    checked = 0
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_rendering_is_deterministic(path):
    cr = load_yaml(path)
    a = yaml.safe_dump_all(render(cr))
    b = yaml.safe_dump_all(render(copy.deepcopy(cr)))
    assert a == b


def _diff(cr_a, cr_b, facts=None):
    a, b = by_kind(render(cr_a, facts)), by_kind(render(cr_b, facts))
    changed = {k for k in a.keys() & b.keys() if json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True)}
    return changed, set(b) - set(a), set(a) - set(b)


def test_every_child_has_recommended_labels_and_namespace():
    for obj in render(example("sd15-production")):
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "component", "part-of", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, (obj["kind"], key)
        assert obj["metadata"]["namespace"] == "images"


def test_batch_size_changes_only_configmap_and_pod_template():
    a = example("sd15-production")
    b = copy.deepcopy(a)
    b["spec"]["batching"]["maxBatchSize"] = 4
    changed, added, removed = _diff(a, b)
    assert changed == {("ConfigMap", "sd15-config"), ("Deployment", "sd15")}
    assert not added and not removed
    dep = by_kind(render(b))[("Deployment", "sd15")]
    assert (
        by_kind(render(a))[("Deployment", "sd15")]["spec"]["template"]["metadata"]["annotations"]
        != dep["spec"]["template"]["metadata"]["annotations"]
    )


@pytest.mark.parametrize(
    "section,fields,key,value",
    [
        ("server", {"warmupSizes": [{"width": 768, "height": 768}]}, "SDSERVE_WARMUP_SIZES", "768x768"),
        ("server", {"compile": True, "compileMode": "reduce-overhead"}, "SDSERVE_COMPILE_MODE", "reduce-overhead"),
        ("server", {"stallSeconds": 900}, "SDSERVE_STALL_SECONDS", "900"),
        ("cache", {"maxMemory": "1.5Gi"}, "SDSERVE_CACHE_MAX_BYTES", str(3 * 2**29)),
        (
            "rateLimit",
            {"trustedProxies": ["10.0.0.1/8", "fd00::/8", "192.0.2.7"]},  # host bits (uvicorn: no match), one address
            "SDSERVE_FORWARDED_ALLOW_IPS",
            "10.0.0.0/8,fd00::/8,192.0.2.7/32",
        ),
        ("defaults", {"size": {"width": 640, "height": 512}}, "SDSERVE_DEFAULT_SIZE", "640x512"),
        ("defaults", {"steps": 4}, "SDSERVE_DEFAULT_STEPS", "4"),
        ("defaults", {"guidanceScale": 0}, "SDSERVE_DEFAULT_GUIDANCE_SCALE", "0.0"),
        ("defaults", {"negativePrompt": "blurry, text"}, "SDSERVE_DEFAULT_NEGATIVE_PROMPT", "blurry, text"),
    ],
    ids=[
        "warmupSizes",
        "compileMode",
        "stallSeconds",
        "cache.maxMemory",
        "rateLimit.trustedProxies",
        "defaults.size",
        "defaults.steps",
        "defaults.guidanceScale",
        "defaults.negativePrompt",
    ],
)
def test_optional_settings_reach_the_server_and_their_absence_keeps_the_config_hash(section, fields, key, value):
    """A service without the field renders no key: the operator's upgrade does not change its
    ConfigMap, so its pods are not rolled."""
    a = example("sd15-production")
    assert key not in by_kind(render(a))[("ConfigMap", "sd15-config")]["data"]
    b = copy.deepcopy(a)
    b["spec"].setdefault(section, {}).update(fields)
    changed, added, removed = _diff(a, b)
    assert changed == {("ConfigMap", "sd15-config"), ("Deployment", "sd15")}
    assert by_kind(render(b))[("ConfigMap", "sd15-config")]["data"][key] == value


def test_replicas_max_changes_hpa_and_alert_only():
    a = example("sd15-production")
    b = copy.deepcopy(a)
    b["spec"]["replicas"]["max"] = 12
    changed, added, removed = _diff(a, b)
    assert changed == {("HorizontalPodAutoscaler", "sd15"), ("PrometheusRule", "sd15")}


def test_disabling_monitoring_removes_only_monitoring_objects():
    a = example("sd15-production")
    b = copy.deepcopy(a)
    b["spec"]["monitoring"].update(serviceMonitor=False, prometheusRule=False, dashboard=False)
    changed, added, removed = _diff(a, b)
    assert removed == {("ServiceMonitor", "sd15"), ("PrometheusRule", "sd15"), ("ConfigMap", "sd15-dashboard")}
    assert not changed and not added


def test_ingress_off_removes_ingress_and_changes_nothing_else():
    a = example("sd15-production")
    b = copy.deepcopy(a)
    b["spec"]["ingress"]["enabled"] = False
    changed, added, removed = _diff(a, b)
    assert removed == {("Ingress", "sd15")} and not changed


def test_managed_redis_renders_redis_and_points_server_at_it():
    objs = by_kind(render(example("sd15-production")))
    assert ("Deployment", "sd15-redis") in objs and ("Service", "sd15-redis") in objs
    env = objs[("Deployment", "sd15")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "SDSERVE_REDIS_URL", "value": "redis://sd15-redis.images.svc:6379/0"} in env


def test_cache_none_has_no_redis_and_settings_say_none():
    cr = example("sd15-production")
    cr["spec"]["cache"] = {"type": "none"}
    objs = by_kind(render(cr))
    assert not any(name.endswith("-redis") for _, name in objs)
    assert objs[("ConfigMap", "sd15-config")]["data"]["SDSERVE_CACHE_TYPE"] == "none"


def test_gpu_preset_sets_limits_node_affinity_and_batch():
    objs = by_kind(render(example("minimal")))
    pod = objs[("Deployment", "sd-minimal")]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"][0]["values"][0] == "NVIDIA-A100-SXM4-40GB"
    assert objs[("ConfigMap", "sd-minimal-config")]["data"]["SDSERVE_MAX_BATCH_SIZE"] == "8"
    cr = example("minimal")
    cr["spec"]["gpu"] = {"type": "rtx3080-10gb"}
    assert by_kind(render(cr))[("ConfigMap", "sd-minimal-config")]["data"]["SDSERVE_MAX_BATCH_SIZE"] == "2"


def test_deployment_is_restricted_and_has_probes_drain_and_shm():
    pod = by_kind(render(example("minimal")))[("Deployment", "sd-minimal")]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["lifecycle"]["preStop"]["exec"]["command"][:2] == ["sdserve", "drain"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_autoscaled_deployment_leaves_replicas_to_the_autoscaler():
    dep = by_kind(render(example("sd15-production")))[("Deployment", "sd15")]
    assert "replicas" not in dep["spec"]
    tiny = by_kind(render(example("tiny-cpu")))[("Deployment", "sd-tiny")]
    assert tiny["spec"]["replicas"] == 1


def test_scale_to_zero_goes_through_the_keda_http_add_on():
    objs = by_kind(render(example("keda-scale-to-zero")))
    hso = objs[("HTTPScaledObject", "sd-on-demand")]["spec"]
    assert hso["replicas"] == {"min": 0, "max": 3} and hso["scaledownPeriod"] == 900
    assert hso["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sd-on-demand",
        "service": "sd-on-demand",
        "port": 80,
    }
    assert hso["hosts"] == ["sd-on-demand-wake.tools.svc", "sd-on-demand-wake.tools.svc.cluster.local"]
    assert hso["pathPrefixes"] == ["/v1", "/generate"] and hso["timeouts"]["conditionWait"] == "900s"
    wake = objs[("Service", "sd-on-demand-wake")]["spec"]
    assert wake["type"] == "ExternalName"
    assert wake["externalName"] == "keda-add-ons-http-interceptor-proxy.keda.svc.cluster.local"
    # The add-on makes its own ScaledObject; a second one on the same Deployment is refused by KEDA.
    assert not any(k in ("ScaledObject", "HorizontalPodAutoscaler") for k, _ in objs)
    assert "replicas" not in objs[("Deployment", "sd-on-demand")]["spec"]


def test_the_ingress_leads_to_the_interceptor_at_scale_to_zero():
    cr = example("keda-scale-to-zero")
    cr["spec"]["ingress"] = {"enabled": True, "host": "sd.example.com"}
    objs = by_kind(render(cr))
    backends = {
        p["backend"]["service"]["name"] for p in objs[("Ingress", "sd-on-demand")]["spec"]["rules"][0]["http"]["paths"]
    }
    assert backends == {"sd-on-demand-wake"}
    assert objs[("HTTPScaledObject", "sd-on-demand")]["spec"]["hosts"][0] == "sd.example.com"


def test_without_the_http_add_on_scale_to_zero_is_refused_and_one_replica_stays():
    from sdop.api import CUSTOM_METRICS_API, KEDA_API, MONITORING_API

    facts = ClusterFacts(optional_apis=frozenset({KEDA_API, MONITORING_API, CUSTOM_METRICS_API}))
    objs = by_kind(render(example("keda-scale-to-zero"), facts))
    assert not any(k in ("HTTPScaledObject",) or n.endswith("-wake") for k, n in objs)
    so = objs[("ScaledObject", "sd-on-demand")]["spec"]
    assert so["minReplicaCount"] == 1 and "sdserve_queue_depth" in so["triggers"][0]["metadata"]["query"]
    # Waiting and running work; handed-off jobs are in the queue depth, each replica its share.
    sel = 'namespace="tools",service="sd-on-demand"'
    assert (
        so["triggers"][0]["metadata"]["query"]
        == f"sum(sdserve_queue_depth{{{sel}}}) + sum(sdserve_inflight_requests{{{sel}}})"
    )


def test_hpa_targets_queue_depth_per_pod():
    hpa = by_kind(render(example("sd15-production")))[("HorizontalPodAutoscaler", "sd15")]
    m = hpa["spec"]["metrics"][0]
    assert m["type"] == "Pods" and m["pods"]["metric"]["name"] == "sdserve_queue_depth"
    assert m["pods"]["target"]["averageValue"] == "6"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600


def test_without_optional_apis_monitoring_and_keda_objects_are_left_out():
    facts = ClusterFacts(optional_apis=frozenset())
    kinds = {o["kind"] for o in render(example("sd15-production"), facts)} | {
        o["kind"] for o in render(example("keda-scale-to-zero"), facts)
    }
    assert not kinds & CRD_KINDS


def test_model_change_renames_prefetch_job():
    a = example("sd15-production")
    b = copy.deepcopy(a)
    b["spec"]["model"]["revision"] = "v2"
    changed, added, removed = _diff(a, b)
    assert len(added) == 1 and next(iter(added))[0] == "Job"
    assert len(removed) == 1 and next(iter(removed))[0] == "Job"


def test_preset_conflict_is_a_spec_error_naming_the_field():
    cr = example("minimal")
    cr["spec"]["scheduling"] = {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    with pytest.raises(SpecError) as e:
        render(cr)
    assert e.value.fields == ["spec.scheduling.nodeSelector[nvidia.com/gpu.product]"]
    cr = example("minimal")
    cr["spec"]["batching"] = {"maxBatchSize": 32}
    with pytest.raises(SpecError) as e:
        render(cr)
    assert e.value.fields == ["spec.batching.maxBatchSize"]
    cr = example("minimal")  # the sizes pass the default limits (1024), not the preset's largest side (768)
    cr["spec"]["server"] = {"warmupSizes": [{"width": 512, "height": 512}, {"width": 1024, "height": 1024}]}
    cr["spec"]["gpu"] = {"type": "rtx3080-10gb"}
    cr["spec"]["defaults"] = {"size": {"width": 1024, "height": 768}}
    with pytest.raises(SpecError) as e:
        render(cr)
    assert "spec.server.warmupSizes[1]" in e.value.fields and "spec.defaults.size" in e.value.fields


def test_the_content_check_needs_a_checker_where_the_model_ships_none():
    def config(cr) -> dict:
        return next(o for o in render(cr) if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config"))

    cr = example("sdxl")
    assert config(cr)["data"]["SDSERVE_SAFETY_CHECKER"] == "CompVis/stable-diffusion-safety-checker"
    del cr["spec"]["safety"]["checker"]
    with pytest.raises(SpecError) as e:
        render(cr)
    assert e.value.fields == ["spec.safety.checker"] and "an SDXL model" in str(e.value)
    sd15 = example("sd15-production")  # SD 1.5 ships its own: nothing to set
    assert sd15["spec"]["safety"]["nsfwCheck"] and "SDSERVE_SAFETY_CHECKER" not in config(sd15)["data"]
    sd15["spec"]["canary"] = {"model": {"path": "/models/candidate.safetensors"}}
    with pytest.raises(SpecError) as e:
        render(sd15)
    assert e.value.fields == ["spec.safety.checker"] and "spec.canary.model is a single-file checkpoint" in str(e.value)


@pytest.mark.parametrize(
    "gpu,refused",
    [({"type": "a100-40gb"}, True), ({"type": "h100-80gb"}, False), ({"type": "custom", "count": 0}, True)],
)
def test_fp8_is_refused_on_gpus_without_fp8_kernels(gpu, refused):
    cr = example("minimal")
    cr["spec"]["gpu"] = gpu
    cr["spec"]["server"] = {"quantization": "fp8"}
    if not refused:
        render(cr)
        return
    with pytest.raises(SpecError) as e:
        render(cr)
    assert e.value.fields == ["spec.server.quantization"] and "8.9" in str(e.value)


def test_the_ingress_publishes_only_the_image_api():
    objs = by_kind(render(example("sd15-production")))
    paths = objs[("Ingress", "sd15")]["spec"]["rules"][0]["http"]["paths"]
    assert [(p["path"], p["pathType"]) for p in paths] == [("/v1", "Prefix"), ("/generate", "Exact")]


def test_each_service_has_its_own_dashboard_uid():
    def uid(name: str, ns: str) -> str:
        import json

        cr = example("sd15-production")
        cr["metadata"] = {"name": name, "namespace": ns}
        (cm,) = [o for o in render(cr) if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
        (text,) = cm["data"].values()
        return json.loads(text)["uid"]

    assert len({uid("a", "x"), uid("b", "x"), uid("a", "y")}) == 3


def test_transient_failures_back_off_exponentially():
    from sdop.operator.handlers import retry_delay

    assert [retry_delay(r) for r in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]


def test_the_network_policy_admits_the_named_namespaces_and_can_restrict_egress():
    cr = example("sd15-production")
    cr["spec"]["service"] = {"allowedNamespaces": ["ingress-nginx", "monitoring"], "restrictEgress": True}
    policy = by_kind(render(cr))[("NetworkPolicy", "sd15")]["spec"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert source["namespaceSelector"]["matchExpressions"][0]["values"] == ["images", "ingress-nginx", "monitoring"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert {p["port"] for e in policy["egress"] for p in e["ports"]} == {53, 443, 6379}
    open_policy = by_kind(render(example("sd15-production")))[("NetworkPolicy", "sd15")]["spec"]
    assert "from" not in open_policy["ingress"][0] and "egress" not in open_policy


def test_every_sdserve_series_carries_the_model_revision():
    cr = example("sd15-production")
    cr["spec"]["model"]["revision"] = "refs/pr/12"
    objs = by_kind(render(cr))
    labels = objs[("Deployment", "sd15")]["spec"]["template"]["metadata"]["labels"]
    value = labels["sdop.io/model-revision"]
    assert value.startswith("refs-pr-12-") and len(value) <= 63  # a label value, unique per revision
    relabel = objs[("ServiceMonitor", "sd15")]["spec"]["endpoints"][0]["relabelings"]
    assert relabel == [
        {
            "sourceLabels": ["__meta_kubernetes_pod_label_sdop_io_model_revision"],
            "targetLabel": "revision",
            "action": "replace",
        },
        # stable or canary: the canary's error ratio is read by it
        {"sourceLabels": ["__meta_kubernetes_pod_label_sdop_io_track"], "targetLabel": "track", "action": "replace"},
    ]
    assert labels["sdop.io/track"] == "stable"
    plain = by_kind(render(example("sd15-production")))
    assert plain[("Deployment", "sd15")]["spec"]["template"]["metadata"]["labels"]["sdop.io/model-revision"] == "main"
