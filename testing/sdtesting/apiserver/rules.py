"""What kube-apiserver does to an object of a built-in kind before it stores it.

- ``normalise``: quantities to their canonical form (``"1.5"`` -> ``"1500m"``);
- ``default``: the defaults the operator's comparisons meet (Service clusterIP/type/ports,
  Deployment replicas/strategy, Job selector and template labels, pod and container fields);
- ``validate``: names per kind, labels, annotations, tolerations, resources, rollout,
  ingress class (field path, message);
- ``immutable``: fields that may not change on update (Job selector and template, PVC spec
  except storage requests growing, Service clusterIP, Deployment selector).

Only the rules the operator's objects can meet are here; admission webhooks, quotas,
PodSecurity admission and LimitRanges are not modelled.
"""

from __future__ import annotations

import copy
import ipaddress
import itertools
from typing import Any

from . import names, quantity

Errors = list[tuple[str, str]]

_CLUSTER_IPS = (str(ipaddress.ip_address("10.96.0.10") + i) for i in itertools.count())
_STANDARD_RESOURCES = {"cpu", "memory", "ephemeral-storage", "storage", "pods"}
_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute", ""}

# Per kind: the name rule, and the longest name (Jobs put their name in a pod label).
_NAME_RULE = {
    "Service": names.dns1035_label,
    "Namespace": names.dns1123_label,
}
_MAX_NAME = {"Job": 63}


# ---- normalise -----------------------------------------------------------------------------


def _canonical_map(values: Any, field: str, errors: Errors) -> Any:
    if not isinstance(values, dict):
        return values
    out = {}
    for k, v in values.items():
        try:
            out[k] = quantity.canonical(v)
        except quantity.QuantityError as e:
            errors.append((f"{field}[{k}]", f"Invalid value: {v!r}: {e}"))
            out[k] = v
    return out


def _pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return [("spec.template.spec", (spec.get("template") or {}).get("spec") or {})]
    if kind == "Pod":
        return [("spec", spec)]
    return []


def normalise(obj: dict[str, Any]) -> Errors:
    errors: Errors = []
    for field, pod in _pod_specs(obj):
        for group in ("initContainers", "containers"):
            for i, c in enumerate(pod.get(group) or []):
                res = c.get("resources") or {}
                for part in ("requests", "limits"):
                    if part in res:
                        res[part] = _canonical_map(res[part], f"{field}.{group}[{i}].resources.{part}", errors)
        for v in pod.get("volumes") or []:
            if "sizeLimit" in (v.get("emptyDir") or {}):
                v["emptyDir"]["sizeLimit"] = quantity.canonical(v["emptyDir"]["sizeLimit"])
    if obj.get("kind") == "PersistentVolumeClaim":
        res = (obj.get("spec") or {}).get("resources") or {}
        if "requests" in res:
            res["requests"] = _canonical_map(res["requests"], "spec.resources.requests", errors)
    return errors


# ---- default -------------------------------------------------------------------------------


def _default_pod(pod: dict[str, Any]) -> None:
    pod.setdefault("restartPolicy", "Always")
    pod.setdefault("dnsPolicy", "ClusterFirst")
    pod.setdefault("schedulerName", "default-scheduler")
    pod.setdefault("terminationGracePeriodSeconds", 30)
    pod.setdefault("securityContext", {})
    for c in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
        image = str(c.get("image", ""))
        latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
        c.setdefault("imagePullPolicy", "Always" if latest and "@" not in image else "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        for p in c.get("ports") or []:
            p.setdefault("protocol", "TCP")


def default(obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    kind = obj.get("kind")
    spec = obj.setdefault("spec", {}) if kind in ("Service", "Deployment", "Job", "PersistentVolumeClaim") else {}
    for _field, pod in _pod_specs(obj):
        _default_pod(pod)
    if kind == "Service":
        old_spec = (old or {}).get("spec") or {}
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if spec["type"] != "ExternalName":  # an ExternalName Service is a DNS alias: no IP
            if spec.get("clusterIP") is None:
                spec["clusterIP"] = old_spec.get("clusterIP") or next(_CLUSTER_IPS)
            spec.setdefault("clusterIPs", [spec["clusterIP"]] if spec["clusterIP"] != "None" else ["None"])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        for p in spec.get("ports") or []:
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
    elif kind == "Deployment":
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
        if strategy.get("type", "RollingUpdate") == "RollingUpdate":
            strategy.setdefault("type", "RollingUpdate")
            ru = strategy.setdefault("rollingUpdate", {})
            ru.setdefault("maxSurge", "25%")
            ru.setdefault("maxUnavailable", "25%")
    elif kind == "Job":
        uid = obj["metadata"].get("uid") or ""
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        if not spec.get("manualSelector"):
            spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
            labels = spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
            labels.setdefault("batch.kubernetes.io/controller-uid", uid)
            labels.setdefault("batch.kubernetes.io/job-name", obj["metadata"]["name"])
            labels.setdefault("controller-uid", uid)
            labels.setdefault("job-name", obj["metadata"]["name"])
    elif kind == "PersistentVolumeClaim":
        spec.setdefault("volumeMode", "Filesystem")


# ---- validate ------------------------------------------------------------------------------


def validate_meta(obj: dict[str, Any]) -> Errors:
    meta = obj.get("metadata") or {}
    errors: Errors = []
    name = str(meta.get("name") or "")
    rule = _NAME_RULE.get(str(obj.get("kind")), names.dns1123_subdomain)
    if msg := rule(name):
        errors.append(("metadata.name", f"Invalid value: {name!r}: {msg}"))
    limit = _MAX_NAME.get(str(obj.get("kind")))
    if limit and len(name) > limit:
        errors.append(("metadata.name", f"Invalid value: {name!r}: must be no more than {limit} characters"))
    errors += names.labels(meta.get("labels"), "metadata.labels")
    errors += names.annotation_keys(meta.get("annotations"), "metadata.annotations")
    return errors


def _resources(res: dict[str, Any], field: str) -> Errors:
    errors: Errors = []
    requests, limits = res.get("requests") or {}, res.get("limits") or {}
    for part, values in (("requests", requests), ("limits", limits)):
        for key in values:
            standard = key in _STANDARD_RESOURCES or key.startswith("hugepages-")
            if names.qualified_name(key) or ("/" not in key and not standard):
                errors.append(
                    (f"{field}.{part}[{key}]", "Invalid value: must be a standard resource type or fully qualified")
                )
    for key in set(requests) | set(limits):
        if "/" in key and not key.startswith(("kubernetes.io/", "requests.")):
            if key in requests and requests.get(key) != limits.get(key):
                errors.append(
                    (f"{field}.requests[{key}]", "Invalid value: must be equal to the limit (extended resource)")
                )
    for key in set(requests) & set(limits):
        try:
            if quantity.parse(requests[key])[0] > quantity.parse(limits[key])[0]:
                errors.append((f"{field}.requests", f"Invalid value: {key} must be less than or equal to its limit"))
        except quantity.QuantityError:
            pass
    return errors


def _tolerations(tolerations: list[dict[str, Any]], field: str) -> Errors:
    errors: Errors = []
    for i, t in enumerate(tolerations):
        f = f"{field}[{i}]"
        if t.get("key") and (msg := names.qualified_name(t["key"])):
            errors.append((f"{f}.key", msg))
        op = t.get("operator", "Equal")
        if op == "Exists" and t.get("value"):
            errors.append((f"{f}.operator", "Invalid value: value must be empty when `operator` is 'Exists'"))
        if op not in ("Equal", "Exists"):
            errors.append((f"{f}.operator", f"Unsupported value: {op!r}"))
        if t.get("effect", "") not in _EFFECTS:
            errors.append((f"{f}.effect", f"Unsupported value: {t.get('effect')!r}"))
        if t.get("tolerationSeconds") is not None and t.get("effect") != "NoExecute":
            errors.append((f"{f}.effect", "Invalid value: effect must be 'NoExecute' when `tolerationSeconds` is set"))
        if not t.get("key") and op != "Exists":
            errors.append((f"{f}.operator", "Invalid value: operator must be Exists when `key` is empty"))
    return errors


def _pod(pod: dict[str, Any], field: str) -> Errors:
    errors: Errors = []
    for group in ("initContainers", "containers"):
        for i, c in enumerate(pod.get(group) or []):
            f = f"{field}.{group}[{i}]"
            if msg := names.dns1123_label(str(c.get("name", ""))):
                errors.append((f"{f}.name", msg))
            image = c.get("image")
            if not image or image != image.strip():
                errors.append((f"{f}.image", "Required value, without leading or trailing whitespace"))
            errors += _resources(c.get("resources") or {}, f"{f}.resources")
    for k, v in (pod.get("nodeSelector") or {}).items():
        if msg := names.qualified_name(k):
            errors.append((f"{field}.nodeSelector[{k}]", msg))
        if msg := names.label_value(v):
            errors.append((f"{field}.nodeSelector[{k}]", msg))
    errors += _tolerations(pod.get("tolerations") or [], f"{field}.tolerations")
    for key in ("serviceAccountName", "priorityClassName"):
        if pod.get(key) and (msg := names.dns1123_subdomain(pod[key])):
            errors.append((f"{field}.{key}", msg))
    return errors


def _is_zero(value: Any) -> bool:
    return value in (0, "0", "0%")


def validate(obj: dict[str, Any]) -> Errors:
    errors = validate_meta(obj)
    spec = obj.get("spec") or {}
    for field, pod in _pod_specs(obj):
        errors += _pod(pod, field)
    kind = obj.get("kind")
    if kind in ("Deployment", "Job"):
        template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels")
        errors += names.labels(template_labels, "spec.template.metadata.labels")
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        if kind == "Deployment" and any((template_labels or {}).get(k) != v for k, v in selector.items()):
            errors.append(
                ("spec.template.metadata.labels", "Invalid value: `selector` does not match template `labels`")
            )
    if kind == "Deployment":
        ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        if _is_zero(ru.get("maxSurge", "25%")) and _is_zero(ru.get("maxUnavailable", "25%")):
            errors.append(
                ("spec.strategy.rollingUpdate.maxUnavailable", "Invalid value: may not be 0 when `maxSurge` is 0")
            )
    if kind == "Ingress":
        cls = spec.get("ingressClassName")
        if cls and (msg := names.dns1123_subdomain(cls)):
            errors.append(("spec.ingressClassName", f"Invalid value: {cls!r}: {msg}"))
    if kind == "Service":
        if spec.get("type") == "ExternalName" and (msg := names.dns1123_subdomain(str(spec.get("externalName", "")))):
            errors.append(("spec.externalName", f"Invalid value: {msg}"))
        for i, p in enumerate(spec.get("ports") or []):
            if not 1 <= int(p.get("port", 0)) <= 65535:
                errors.append((f"spec.ports[{i}].port", "Invalid value: must be between 1 and 65535"))
    if kind == "PersistentVolumeClaim" and "storage" not in ((spec.get("resources") or {}).get("requests") or {}):
        errors.append(("spec.resources[storage]", "Required value"))
    return errors


# ---- immutable -----------------------------------------------------------------------------


def _storage(obj: dict[str, Any]) -> Any:
    return ((obj.get("spec") or {}).get("resources") or {}).get("requests", {}).get("storage")


def immutable(old: dict[str, Any], new: dict[str, Any]) -> Errors:
    kind, o, n = new.get("kind"), old.get("spec") or {}, new.get("spec") or {}
    errors: Errors = []
    if kind == "Job":
        for key in ("selector", "template", "completions"):
            if o.get(key) != n.get(key):
                errors.append((f"spec.{key}", "Invalid value: field is immutable"))
    elif kind == "Deployment":
        if o.get("selector") != n.get("selector"):
            errors.append(("spec.selector", "Invalid value: field is immutable"))
    elif kind == "Service":
        if o.get("clusterIP") and n.get("clusterIP") != o.get("clusterIP"):
            errors.append(("spec.clusterIP", "Invalid value: field is immutable"))
    elif kind == "PersistentVolumeClaim":
        strip = copy.deepcopy(o), copy.deepcopy(n)
        for s in strip:
            s.get("resources", {}).get("requests", {}).pop("storage", None)
            s.pop("volumeAttributesClassName", None)
        if strip[0] != strip[1]:
            errors.append(("spec", "Forbidden: spec is immutable after creation except resources.requests"))
        elif quantity.parse(_storage(new))[0] < quantity.parse(_storage(old))[0]:
            errors.append(("spec.resources.requests.storage", "Forbidden: field can not be less than previous value"))
    elif kind in ("ConfigMap", "Secret") and old.get("immutable"):
        if old.get("data") != new.get("data") or old.get("binaryData") != new.get("binaryData"):
            errors.append(("data", "Forbidden: field is immutable when `immutable` is set"))
    return errors
