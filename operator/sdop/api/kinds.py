"""Every Kubernetes kind the operator reads or writes: one table, one row per kind.

The client's REST paths, discovery of optional APIs, pruning and the test of the Helm
chart's RBAC are all derived from this table. Adding a managed kind is a row here and a
builder in ``sdop.render``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .resource import API_VERSION, KIND, PLURAL

MONITORING_API = "monitoring.coreos.com/v1"
KEDA_API = "keda.sh/v1alpha1"
#: The KEDA HTTP add-on: its interceptor holds requests while a service scales from zero.
KEDA_HTTP_API = "http.keda.sh/v1alpha1"
#: The Gateway API: an HTTPRoute publishes the service and splits traffic to a canary by weight.
GATEWAY_API = "gateway.networking.k8s.io/v1"
#: Served by prometheus-adapter: the HPA reads the pods' queue depth through it.
CUSTOM_METRICS_API = "custom.metrics.k8s.io/v1beta1"


@dataclass(frozen=True)
class Kind:
    """One kind and how to reach it."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True
    #: The group/version that must be discovered before the kind is used; None: always served.
    optional_api: str | None = None
    #: A child that ``render()`` may produce (applied, pruned, garbage collected with the CR).
    managed: bool = True

    @property
    def group(self) -> str:
        """The API group ("" for the core group), as RBAC rules name it."""
        return self.api_version.rpartition("/")[0]


MANAGED: tuple[Kind, ...] = (
    Kind("v1", "ServiceAccount", "serviceaccounts"),
    Kind("v1", "ConfigMap", "configmaps"),
    Kind("v1", "Service", "services"),
    Kind("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    Kind("apps/v1", "Deployment", "deployments"),
    Kind("batch/v1", "Job", "jobs"),
    Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
    Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    Kind("networking.k8s.io/v1", "Ingress", "ingresses"),
    Kind(MONITORING_API, "ServiceMonitor", "servicemonitors", optional_api=MONITORING_API),
    Kind(MONITORING_API, "PrometheusRule", "prometheusrules", optional_api=MONITORING_API),
    Kind(KEDA_API, "ScaledObject", "scaledobjects", optional_api=KEDA_API),
    Kind(KEDA_HTTP_API, "HTTPScaledObject", "httpscaledobjects", optional_api=KEDA_HTTP_API),
    Kind(GATEWAY_API, "HTTPRoute", "httproutes", optional_api=GATEWAY_API),
)

#: Kinds the operator reads or writes that it does not render.
OTHER: tuple[Kind, ...] = (
    Kind(API_VERSION, KIND, PLURAL, managed=False),
    Kind("v1", "Event", "events", managed=False),
    Kind("coordination.k8s.io/v1", "Lease", "leases", managed=False),
    # Read for status: why replicas are not ready (scheduling, image pulls, crashes, quotas).
    Kind("v1", "Pod", "pods", managed=False),
    Kind("apps/v1", "ReplicaSet", "replicasets", managed=False),
)

KINDS: dict[str, Kind] = {k.kind: k for k in (*MANAGED, *OTHER)}

#: Optional APIs the operator discovers, in a stable order: those a managed kind needs, and
#: the custom metrics API an HPA on queue depth needs to work.
OPTIONAL_APIS: tuple[str, ...] = tuple(
    sorted({k.optional_api for k in MANAGED if k.optional_api} | {CUSTOM_METRICS_API})
)


def kind_of(kind: str) -> Kind:
    """The row of a kind; KeyError names a kind nobody added to the table."""
    try:
        return KINDS[kind]
    except KeyError:
        raise KeyError(f"{kind} is not in sdop.api.kinds: add a row for it") from None
