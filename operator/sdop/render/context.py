"""What rendering needs besides the CR: names, labels and cluster facts, all plain data."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..api import (
    CUSTOM_METRICS_API,
    DEFAULT_IMAGE_REPOSITORY,
    DEFAULT_IMAGE_TAG,
    GATEWAY_API,
    KEDA_API,
    KEDA_HTTP_API,
    OPTIONAL_APIS,
    StableDiffusionService,
)
from ..api.presets import GpuPreset, preset
from ..api.semantics import max_batch_size
from ..api.spec import StableDiffusionServiceSpec

if TYPE_CHECKING:
    from .rollout import Plan

HTTP_PORT = 8000
APP_NAME = "stable-diffusion"


@dataclass(frozen=True)
class ClusterFacts:
    """Facts about the cluster the operator discovered (the CLI assumes everything is there)."""

    optional_apis: frozenset[str] = frozenset(OPTIONAL_APIS)
    default_image_repository: str = DEFAULT_IMAGE_REPOSITORY
    default_image_tag: str = DEFAULT_IMAGE_TAG


@dataclass(frozen=True)
class Ctx:
    """What one set of builders renders from. ``cr`` is the CR as the track sees it (spec.model
    is the model this track serves); ``rollout`` is the plan for the whole service."""

    cr: StableDiffusionService
    facts: ClusterFacts = field(default_factory=ClusterFacts)
    #: "stable" (spec.model, or the last good model after a rollback) or "canary".
    track: str = "stable"
    rollout_plan: Plan | None = None

    @property
    def plan(self) -> Plan:
        if self.rollout_plan is not None:
            return self.rollout_plan
        from .rollout import plan

        return plan(self.cr)

    @property
    def is_canary(self) -> bool:
        return self.track == "canary"

    @property
    def workload_name(self) -> str:
        """The Deployment of this track."""
        return self.child("canary") if self.is_canary else self.name

    @property
    def config_name(self) -> str:
        """The ConfigMap of this track's server settings."""
        return self.child("canary-config" if self.is_canary else "config")

    @property
    def gateway_routing(self) -> bool:
        """Published through an HTTPRoute: spec.gateway is set and the cluster serves the Gateway API."""
        return self.spec.gateway is not None and self.has_api(GATEWAY_API)

    @property
    def spec(self) -> StableDiffusionServiceSpec:
        return self.cr.spec

    @property
    def name(self) -> str:
        return self.cr.metadata.name

    @property
    def namespace(self) -> str:
        return self.cr.metadata.namespace

    @property
    def preset(self) -> GpuPreset:
        return preset(self.spec.gpu.type)

    @property
    def max_batch_size(self) -> int:
        return max_batch_size(self.spec)

    @property
    def image(self) -> str:
        img = self.spec.image
        return f"{img.repository or self.facts.default_image_repository}:{img.tag or self.facts.default_image_tag}"

    def child(self, suffix: str = "") -> str:
        return fit(f"{self.name}-{suffix}" if suffix else self.name)

    @property
    def scales_to_zero(self) -> bool:
        """Scale to zero that can wake: KEDA and its HTTP add-on are there to hold requests."""
        a = self.spec.autoscaling
        return (
            a.enabled
            and a.provider == "keda"
            and a.scale_to_zero
            and self.has_api(KEDA_API)
            and self.has_api(KEDA_HTTP_API)
        )

    @property
    def wake_service(self) -> str:
        """The Service clients use when the service scales to zero: it leads to the interceptor."""
        return self.child("wake")

    @property
    def autoscaled(self) -> bool:
        """Whether an autoscaler is rendered and can work: else the Deployment holds replicas.min."""
        a = self.spec.autoscaling
        if not a.enabled:
            return False
        return self.has_api(CUSTOM_METRICS_API if a.provider == "hpa" else KEDA_API)

    @property
    def cache_access_mode(self) -> str:
        c = self.spec.model.cache
        return c.access_mode or ("ReadWriteOnce" if self.spec.replicas.max == 1 else "ReadWriteMany")

    @property
    def cache_claim(self) -> str:
        """A PVC's spec is immutable except its size: another storage class or access mode is
        another claim (the cache is filled again); a larger size grows the same claim."""
        c = self.spec.model.cache
        return self.child(f"model-cache-{digest([c.storage_class_name, self.cache_access_mode], 6)}")

    @property
    def revision_label(self) -> str:
        """The model revision as a label value (<= 63 characters, label characters only)."""
        raw = self.spec.model.revision or "main"
        clean = re.sub(r"[^A-Za-z0-9._-]", "-", raw).strip("-._") or "main"
        # A rewritten revision keeps a hash of the original, so two revisions never share a label.
        return fit(clean if clean == raw else f"{clean}-{digest(raw, 8)}")

    @property
    def prefetch_marker(self) -> str:
        """The file the prefetch Job writes when the weights are in the cache; replicas wait for it."""
        m = self.spec.model
        what = [m.id, m.revision, m.variant] + ([self.hub_checker] if self.hub_checker else []) + self.hub_loras
        return f"{HF_CACHE_MOUNT}/.sdop/prefetched-{digest(what, 12)}"

    @property
    def hub_loras(self) -> list[str]:
        """The LoRA adapters given as Hugging Face repos, as the prefetch Job downloads them
        (REPO, or REPO@FILE with a weightName); each replica then loads them from the cache."""
        return [f"{a.id}@{a.weight_name}" if a.weight_name else a.id for a in self.spec.model.loras if a.id]

    @property
    def hub_checker(self) -> str | None:
        """The content check's safety checker when it is a Hugging Face id: the prefetch Job
        downloads it with the model (a path is already in the image)."""
        s = self.spec.safety
        return s.checker if s.nsfw_check and s.checker and not s.checker.startswith("/") else None

    def labels(self, component: str) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": APP_NAME,
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "sdop",
            "app.kubernetes.io/managed-by": "sdop",
        }

    def selector(self, component: str) -> dict[str, str]:
        return {
            k: v
            for k, v in self.labels(component).items()
            if k in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")
        }

    def meta(self, name: str, component: str, **extra: Any) -> dict[str, Any]:
        out = {"name": name, "namespace": self.namespace, "labels": self.labels(component)}
        out.update(extra)
        return out

    def has_api(self, api: str) -> bool:
        return api in self.facts.optional_apis

    @property
    def redis_url_managed(self) -> str:
        return f"redis://{self.child('redis')}.{self.namespace}.svc:6379/0"

    @property
    def endpoint(self) -> str:
        ing = self.spec.ingress
        if ing.enabled and ing.host:
            scheme = "https" if ing.tls else "http"
            return f"{scheme}://{ing.host}{ing.path.rstrip('/')}"
        if self.scales_to_zero:
            return f"http://{self.wake_service}.{self.namespace}.svc:{self.spec.autoscaling.interceptor_port}"
        port = "" if self.spec.service.port == 80 else f":{self.spec.service.port}"
        return f"http://{self.name}.{self.namespace}.svc{port}"


#: Where the model cache volume is mounted (HF_HOME) in the replicas and the prefetch Job.
HF_CACHE_MOUNT = "/var/cache/huggingface"

#: Every child name fits a DNS-1035 label: Service names must, and a Job's name goes into a
#: pod label (<= 63 characters).
MAX_NAME = 63


def fit(name: str, limit: int = MAX_NAME) -> str:
    """The name itself when it fits, else a prefix and a hash of the whole name (still unique)."""
    if len(name) <= limit:
        return name
    return f"{name[: limit - 9].rstrip('-')}-{digest(name, 8)}"


def digest(obj: Any, length: int = 12) -> str:
    """Stable short hash of JSON-able data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]
