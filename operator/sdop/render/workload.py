"""The serving workload: ServiceAccount, Deployment, Service, PodDisruptionBudget."""

from __future__ import annotations

import copy
from typing import Any

from ..api.presets import MATCH_LABELS
from .config import AUTH_DIR, HF_HOME, MODEL_PVC_DIR, SAFETY_DIR, configmap
from .context import HTTP_PORT, Ctx, digest
from .rollout import fingerprint

COMPONENT = "server"
ROUTE_COMPONENT = "route"
#: Pod label carrying the model revision (sdop.render.monitoring maps it to `revision`).
REVISION_LABEL = "sdop.io/model-revision"
#: Pod label telling the stable replicas from the canary's (both carry component=server, so
#: the Service, NetworkPolicy and ServiceMonitor cover both).
TRACK_LABEL = "sdop.io/track"
#: Deployment annotation and pod label: the fingerprint of the model (sdop.render.rollout).
MODEL_FINGERPRINT = "sdop.io/model-fingerprint"
RUN_AS = 1000


def pod_security_context() -> dict[str, Any]:
    """Pod Security Standards "restricted"."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def service_account(ctx: Ctx) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": ctx.meta(ctx.name, COMPONENT),
        "automountServiceAccountToken": False,
    }


def _env(ctx: Ctx) -> list[dict[str, Any]]:
    s = ctx.spec
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": HF_HOME}]
    if s.model.token_secret_ref:
        ref = s.model.token_secret_ref
        env.append({"name": "SDSERVE_HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if s.outputs.s3:
        for name, key_ref in (
            ("SDSERVE_S3_ACCESS_KEY_ID", s.outputs.s3.access_key_id_secret_ref),
            ("SDSERVE_S3_SECRET_ACCESS_KEY", s.outputs.s3.secret_access_key_secret_ref),
        ):
            if key_ref:
                secret = {"name": key_ref.name, "key": key_ref.key}
                env.append({"name": name, "valueFrom": {"secretKeyRef": secret}})
    if s.cache.type == "redis" and s.cache.redis:
        if s.cache.redis.managed:
            env.append({"name": "SDSERVE_REDIS_URL", "value": ctx.redis_url_managed})
        else:
            url = s.cache.redis.url_secret_ref
            assert url is not None, "RedisSpec needs urlSecretRef unless managed"
            env.append({"name": "SDSERVE_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": url.name, "key": url.key}}})
    return env


def _volumes(ctx: Ctx) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    s = ctx.spec
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.resources.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "hf-cache", "mountPath": HF_HOME},
    ]
    if s.model.cache.enabled:
        volumes.append({"name": "hf-cache", "persistentVolumeClaim": {"claimName": ctx.cache_claim}})
    else:
        volumes.append({"name": "hf-cache", "emptyDir": {}})
    if s.model.pvc:
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": s.model.pvc.claim_name, "readOnly": True}}
        )
        mounts.append({"name": "model", "mountPath": MODEL_PVC_DIR, "readOnly": True})
    auth_items = []
    if s.auth.api_keys_secret_ref:
        ref = s.auth.api_keys_secret_ref
        auth_items.append({"secret": {"name": ref.name, "items": [{"key": ref.key, "path": "api-keys"}]}})
    if s.auth.jwt and s.auth.jwt.key_secret_ref:
        ref = s.auth.jwt.key_secret_ref
        auth_items.append({"secret": {"name": ref.name, "items": [{"key": ref.key, "path": "jwt-key"}]}})
    if auth_items:
        volumes.append({"name": "auth", "projected": {"sources": auth_items, "defaultMode": 0o440}})
        mounts.append({"name": "auth", "mountPath": AUTH_DIR, "readOnly": True})
    if s.safety.blocklist_config_map_ref:
        cm = s.safety.blocklist_config_map_ref
        volumes.append(
            {"name": "safety", "configMap": {"name": cm.name, "items": [{"key": cm.key, "path": "blocklist"}]}}
        )
        mounts.append({"name": "safety", "mountPath": SAFETY_DIR, "readOnly": True})
    return volumes, mounts


def _resources(ctx: Ctx) -> dict[str, Any]:
    s = ctx.spec
    cpu = s.resources.cpu or ctx.preset.cpu
    memory = s.resources.memory or ctx.preset.memory
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if s.gpu.count > 0:
        limits[s.gpu.resource_name] = s.gpu.count
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def _probes(ctx: Ctx) -> dict[str, Any]:
    def http(path: str, period: int, failures: int, timeout: int = 2) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": failures,
        }

    startup_period = 10
    return {
        # A model load can take many minutes: the startup probe holds off liveness until then.
        "startupProbe": http(
            "/readyz", startup_period, max(1, ctx.spec.rollout.startup_timeout_seconds // startup_period)
        ),
        "readinessProbe": http("/readyz", 5, 2),
        "livenessProbe": http("/healthz", 10, 3, timeout=5),
    }


def gpu_node_requirement(ctx: Ctx) -> dict[str, Any] | None:
    """The node selector requirement that puts a pod on a node with the preset's GPU (any of
    its form factors), by the label ``gpu.match`` names; None when nothing constrains it."""
    g = ctx.spec.gpu
    if g.count == 0 or g.match == "none":
        return None
    values = list(g.node_label_values) or list(ctx.preset.label_values(g.match))
    if not values:
        return None
    return {"key": MATCH_LABELS[g.match], "operator": "In", "values": values}


def gpu_placement(ctx: Ctx, pod: dict[str, Any]) -> None:
    """Node selector, GPU node affinity and tolerations: what every pod that must run on the
    service's GPU nodes gets (the replicas, and the prefetch Job so a zonal volume binds there)."""
    s = ctx.spec
    if s.scheduling.node_selector:
        pod["nodeSelector"] = dict(sorted(s.scheduling.node_selector.items()))
    if s.scheduling.tolerations:
        pod["tolerations"] = [t.wire() for t in s.scheduling.tolerations]
    affinity = copy.deepcopy(s.scheduling.affinity) if s.scheduling.affinity else None
    requirement = gpu_node_requirement(ctx)
    if requirement is not None:
        affinity = affinity or {}
        required = affinity.setdefault("nodeAffinity", {}).setdefault(
            "requiredDuringSchedulingIgnoredDuringExecution", {"nodeSelectorTerms": [{}]}
        )
        if not required.get("nodeSelectorTerms"):
            required["nodeSelectorTerms"] = [{}]
        # Terms are ORed: the GPU requirement is added to each of them.
        for term in required["nodeSelectorTerms"]:
            term.setdefault("matchExpressions", []).append(requirement)
    if affinity:
        pod["affinity"] = affinity


def _scheduling(ctx: Ctx, pod: dict[str, Any]) -> None:
    s = ctx.spec
    gpu_placement(ctx, pod)
    if s.scheduling.priority_class_name:
        pod["priorityClassName"] = s.scheduling.priority_class_name
    if s.scheduling.topology_spread and s.replicas.max > 1:
        pod["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": ctx.selector(COMPONENT)},
            }
        ]


def pod_selector(ctx: Ctx) -> dict[str, str]:
    """The Deployment selector of a track. The stable one is what it always was (a selector is
    immutable); it also matches the canary's pods, which belong to the canary's ReplicaSets
    (owner references), so neither Deployment adopts the other's pods."""
    sel = ctx.selector(COMPONENT)
    if ctx.is_canary:
        sel[TRACK_LABEL] = "canary"
    return sel


def deployment(ctx: Ctx) -> dict[str, Any]:
    s = ctx.spec
    volumes, mounts = _volumes(ctx)
    container: dict[str, Any] = {
        "name": "sdserve",
        "image": ctx.image,
        "imagePullPolicy": s.image.pull_policy,
        "args": ["serve"],
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": ctx.config_name}}],
        "env": _env(ctx),
        "resources": _resources(ctx),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        # Readiness turns false first, then queued work finishes (see sdserve drain).
        "lifecycle": {"preStop": {"exec": {"command": ["sdserve", "drain", "--port", str(HTTP_PORT)]}}},
        **_probes(ctx),
    }
    pod: dict[str, Any] = {
        "serviceAccountName": ctx.name,
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": s.rollout.termination_grace_period_seconds,
        "containers": [container],
        "volumes": volumes,
    }
    if s.image.pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in s.image.pull_secrets]
    if s.model.cache.enabled and s.model.cache.prefetch:
        # The prefetch Job fills the cache once; replicas wait for its marker instead of each
        # downloading the same weights beside it.
        pod["initContainers"] = [
            {
                "name": "wait-for-model",
                "image": ctx.image,
                "imagePullPolicy": s.image.pull_policy,
                "args": [
                    "wait-for",
                    "--path",
                    ctx.prefetch_marker,
                    "--timeout",
                    str(s.rollout.startup_timeout_seconds),
                ],
                "resources": {
                    "requests": {"cpu": "10m", "memory": "32Mi"},
                    "limits": {"cpu": "100m", "memory": "128Mi"},
                },
                "securityContext": container_security_context(),
                "volumeMounts": [{"name": "hf-cache", "mountPath": HF_HOME, "readOnly": True}],
            }
        ]
    _scheduling(ctx, pod)
    spec: dict[str, Any] = {
        "selector": {"matchLabels": pod_selector(ctx)},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": s.rollout.max_surge, "maxUnavailable": s.rollout.max_unavailable},
        },
        "revisionHistoryLimit": 5,
        "progressDeadlineSeconds": s.rollout.startup_timeout_seconds + 300,
        "template": {
            "metadata": {
                # The revision label becomes the `revision` label of every sdserve_* series
                # (ServiceMonitor relabeling): a new model revision shows apart from the old.
                # The fingerprint tells which model a failing pod was loading (sdop.reconcile.rollout).
                "labels": {
                    **ctx.labels(COMPONENT),
                    REVISION_LABEL: ctx.revision_label,
                    TRACK_LABEL: ctx.track,
                    MODEL_FINGERPRINT: fingerprint(s.model),
                },
                # A settings change rolls the pods.
                "annotations": {"sdop.io/config-hash": digest(configmap(ctx)["data"])},
            },
            "spec": pod,
        },
    }
    if ctx.is_canary:
        # Not autoscaled. Without a Gateway the traffic share follows the replica count, so
        # weight 0 stops the canary's replicas.
        spec["replicas"] = ctx.plan.canary_replicas if ctx.gateway_routing or ctx.plan.canary_weight else 0
    elif not ctx.autoscaled:
        spec["replicas"] = max(1, s.replicas.min)  # 0 only when something can wake it
    # With a working autoscaler, replicas is owned by the HPA / KEDA: leaving it out of the
    # applied object stops the operator and the autoscaler fighting over it (the hand-over
    # keeps the current count: sdop.reconcile.children.hand_over_replicas). Without one
    # (autoscaling off, or its API missing) the Deployment holds replicas.min.
    meta = ctx.meta(ctx.workload_name, COMPONENT)
    meta["labels"][TRACK_LABEL] = ctx.track
    # Read back by sdop.reconcile.rollout: which model a rolled-out Deployment proves good.
    meta["annotations"] = {MODEL_FINGERPRINT: fingerprint(s.model)}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def service(ctx: Ctx) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.meta(ctx.name, COMPONENT),
        "spec": {
            "type": ctx.spec.service.type,
            "selector": ctx.selector(COMPONENT),
            "ports": [{"name": "http", "port": ctx.spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def track_service(ctx: Ctx) -> dict[str, Any] | None:
    """With a canary behind a Gateway: one Service per track, the HTTPRoute's weighted backends
    (``<name>-stable``, ``<name>-canary``). The main Service keeps selecting every replica for
    in-cluster clients. Labelled component=route so the ServiceMonitor does not scrape twice."""
    if not (ctx.gateway_routing and ctx.plan.canary is not None):
        return None
    selector = {**ctx.selector(COMPONENT), TRACK_LABEL: ctx.track}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.meta(ctx.child(ctx.track), ROUTE_COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": ctx.spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(ctx: Ctx) -> dict[str, Any] | None:
    if ctx.spec.replicas.max <= 1:
        return None  # a PDB on one replica would block every node drain
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": ctx.meta(ctx.name, COMPONENT),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": ctx.selector(COMPONENT)}},
    }
