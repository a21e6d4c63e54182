"""The model download cache: a PVC and a Job that fills it before replicas need it."""

from __future__ import annotations

from typing import Any

from .config import HF_HOME
from .context import Ctx, digest
from .workload import container_security_context, gpu_placement, pod_security_context

COMPONENT = "model-cache"


def cache_pvc(ctx: Ctx) -> dict[str, Any] | None:
    c = ctx.spec.model.cache
    if not c.enabled:
        return None
    spec: dict[str, Any] = {"accessModes": [ctx.cache_access_mode], "resources": {"requests": {"storage": c.size}}}
    if c.storage_class_name:
        spec["storageClassName"] = c.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": ctx.meta(ctx.cache_claim, COMPONENT),
        "spec": spec,
    }


def prefetch_job(ctx: Ctx) -> dict[str, Any] | None:
    m = ctx.spec.model
    if not (m.cache.enabled and m.cache.prefetch):
        return None
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": HF_HOME}]
    if m.token_secret_ref:
        env.append(
            {
                "name": "SDSERVE_HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": m.token_secret_ref.name, "key": m.token_secret_ref.key}},
            }
        )
    args = ["prefetch", "--model", m.id, "--revision", m.revision, "--marker", ctx.prefetch_marker]
    if m.variant:
        args += ["--variant", m.variant]
    if ctx.hub_checker:
        args += ["--safety-checker", ctx.hub_checker]
    for lora in ctx.hub_loras:
        args += ["--lora", lora]
    pod: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "serviceAccountName": ctx.name,
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": "prefetch",
                "image": ctx.image,
                "imagePullPolicy": ctx.spec.image.pull_policy,
                "args": args,
                "env": env,
                "resources": {
                    "requests": {"cpu": "500m", "memory": "1Gi"},
                    "limits": {"cpu": "2", "memory": "4Gi"},
                },
                "securityContext": container_security_context(),
                "volumeMounts": [
                    {"name": "hf-cache", "mountPath": HF_HOME},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }
        ],
        "volumes": [
            {"name": "hf-cache", "persistentVolumeClaim": {"claimName": ctx.cache_claim}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    # On the service's GPU nodes: a zonal ReadWriteOnce volume binds where the replicas run.
    gpu_placement(ctx, pod)
    if ctx.spec.image.pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in ctx.spec.image.pull_secrets]
    spec = {
        "backoffLimit": 6,
        "template": {
            "metadata": {"labels": ctx.labels(COMPONENT)},
            "spec": pod,
        },
    }
    # A Job's spec is immutable: any change to it (model, image, pull policy, token, cache
    # claim) is a new Job, named from the whole spec; the old one is pruned.
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": ctx.meta(ctx.child(f"prefetch-{digest(spec, 8)}"), COMPONENT),
        "spec": spec,
    }
