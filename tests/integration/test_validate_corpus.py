"""`sdop validate` says what the API server would say.

A corpus of CRs: every example, and edits a user makes (including each disagreement found
between pydantic and the API server). For each one:

- accepted by ``sdop validate`` -> the test API server accepts the CR (schema, CEL, strict
  field validation) and the operator applies every child cleanly;
- rejected by ``sdop validate`` -> the API server rejects the CR (the CRD carries the same
  formats: names, label keys, tolerations, image references, resource names, rollout), or
  the operator refuses it in status (InvalidSpec: the GPU preset rules).

Image references are checked by the CRD's pattern: the API server itself never parses the
image of a pod; without the pattern the kubelet would fail the pod with InvalidImageName.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable

import pytest

from sdop.api import SpecError, load
from sdtesting.examples import EXAMPLES, example, load_yaml

pytestmark = pytest.mark.integration

NS = "corpus"
BASE = "sd15-production"


def _set(path: str, value) -> Callable[[dict], None]:
    def edit(cr: dict) -> None:
        *parents, last = path.split(".")
        node = cr
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return edit


def _small_gpu_default_size(cr: dict) -> None:
    """An RTX 3080 with the default limits: the CRD's maxWidth (1024) lets a 1024x1024 default
    size through, the preset's largest side (768) does not; nothing else is wrong."""
    spec = cr["spec"]
    spec["gpu"] = {"type": "rtx3080-10gb"}
    spec["limits"] = {k: v for k, v in spec["limits"].items() if k not in ("maxWidth", "maxHeight")}
    spec["batching"] = {}
    spec["defaults"] = {"size": {"width": 1024, "height": 1024}}
    assert load(copy.deepcopy(cr) | {"spec": {**spec, "defaults": {}}}) is not None  # valid without the size


#: (case, edit of the base example, where the rejection shows: "api" the API server refuses
#: the CR, "status" the operator refuses it in status, None: valid, accepted everywhere)
EDITS: list[tuple[str, Callable[[dict], None], str | None]] = [
    ("gpu.count as a string", _set("spec.gpu.count", "1"), "api"),
    ("autoscaling.enabled as a string", _set("spec.autoscaling.enabled", "yes"), "api"),
    ("replicas.max as a float", _set("spec.replicas.max", 2.5), "api"),
    (
        "toleration Exists with a value",
        _set("spec.scheduling.tolerations", [{"key": "gpu", "operator": "Exists", "value": "x"}]),
        "api",
    ),
    (
        "tolerationSeconds with NoSchedule",
        _set("spec.scheduling.tolerations", [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 30}]),
        "api",
    ),
    ("toleration without key or Exists", _set("spec.scheduling.tolerations", [{"value": "x"}]), "api"),
    ("invalid nodeSelector key", _set("spec.scheduling.nodeSelector", {"bad key!": "x"}), "api"),
    ("invalid nodeSelector value", _set("spec.scheduling.nodeSelector", {"pool": "not valid!"}), "api"),
    ("invalid monitoring label key", _set("spec.monitoring.labels", {"-release": "x"}), "api"),
    ("invalid ingress annotation key", _set("spec.ingress.annotations", {"a/b/c": "x"}), "api"),
    ("ingress.className not a name", _set("spec.ingress.className", "Not Valid!"), "api"),
    ("gpu.resourceName with a space", _set("spec.gpu.resourceName", "nvidia gpu"), "api"),
    ("gpu.resourceName without a domain", _set("spec.gpu.resourceName", "gpu"), "api"),
    ("rollout that can never start", _set("spec.rollout", {"maxSurge": 0, "maxUnavailable": 0}), "api"),
    ("image with a space", _set("spec.image", {"repository": "ghcr.io/my repo", "tag": "1"}), "api"),
    ("image with an upper-case registry", _set("spec.image", {"repository": "GHCR.io/sdop/sdserve"}), "api"),
    ("image tag with a colon", _set("spec.image", {"tag": "1:2"}), "api"),
    ("priorityClassName not a name", _set("spec.scheduling.priorityClassName", "High Priority"), "api"),
    ("storageClassName not a name", _set("spec.model.cache.storageClassName", "Fast_SSD"), "api"),
    ("pull secret not a name", _set("spec.image.pullSecrets", ["Reg Cred"]), "api"),
    ("CR name with a dot", _set("metadata.name", "sd.v2"), "api"),
    ("CR name starting with a digit", _set("metadata.name", "1sd"), "api"),
    ("unknown field", _set("spec.gpu.typo", 1), "api"),
    (
        "preset and node selector disagree",
        _set("spec.scheduling.nodeSelector", {"nvidia.com/gpu.product": "x"}),
        "status",
    ),
    ("defaults.steps over limits.maxSteps", _set("spec.defaults", {"steps": 60}), "api"),
    ("defaults.size over the preset's side", _small_gpu_default_size, "status"),
    # Accepted edits: the corpus must also show that valid spellings pass everywhere.
    (
        "turbo defaults",
        _set("spec.defaults", {"steps": 2, "guidanceScale": 0, "size": {"width": 512, "height": 512}}),
        None,
    ),
    ("longest name", _set("metadata.name", "s" + "d" * 62), None),
    (
        "GKE accelerator selector",
        _set("spec.scheduling.nodeSelector", {"cloud.google.com/gke-accelerator": "nvidia-l4"}),
        None,
    ),
    (
        "NoExecute toleration with seconds",
        _set("spec.scheduling.tolerations", [{"key": "gpu", "effect": "NoExecute", "tolerationSeconds": 30}]),
        None,
    ),
    (
        "registry with a port",
        _set("spec.image", {"repository": "registry.local:5000/team/sdserve", "tag": "v1.2_rc-3"}),
        None,
    ),
    ("non-canonical CPU", _set("spec.resources", {"cpu": "1.5", "memory": "49152Mi"}), None),
    ("rollout by surge only", _set("spec.rollout", {"maxSurge": 1, "maxUnavailable": 0}), None),
]


def corpus() -> list[tuple[str, dict, str | None]]:
    out: list[tuple[str, dict, str | None]] = []
    for path in EXAMPLES:
        doc = load_yaml(path)
        if doc.get("kind") == "StableDiffusionService":
            out.append((f"example {path.name}", doc, None))
    base = example(BASE)
    for case, edit, where in EDITS:
        cr = copy.deepcopy(base)
        edit(cr)
        out.append((case, cr, where))
    return out


CORPUS = corpus()


def sdop_validate(cr: dict) -> str | None:
    try:
        load(cr)
    except SpecError as e:
        return str(e)
    return None


@pytest.mark.parametrize(("case", "cr", "where"), CORPUS, ids=[c for c, _, _ in CORPUS])
async def test_sdop_validate_agrees_with_the_api_server(apiserver, reconciler, case, cr, where):
    cr = copy.deepcopy(cr)
    cr["metadata"]["namespace"] = NS
    if cr["metadata"]["name"] == example(BASE)["metadata"]["name"]:
        cr["metadata"]["name"] = f"case-{[c for c, _, _ in CORPUS].index(case)}"  # one name per case
    verdict = sdop_validate(cr)
    if where is None:
        assert verdict is None, f"{case}: sdop validate rejects a valid CR: {verdict}"
    else:
        assert verdict is not None, f"{case}: sdop validate accepts what fails ({where})"
    r = apiserver.http.post(
        apiserver.path(cr["apiVersion"], "stablediffusionservices", NS), json=cr, params={"fieldValidation": "Strict"}
    )
    if where == "api":
        assert r.status_code == 422, f"{case}: the API server accepted what sdop validate rejects ({verdict})"
        return
    assert r.status_code == 201, f"{case}: the API server rejected it: {r.text}"
    body = r.json()
    await reconciler.converge(body, prune=True)
    status = apiserver.get(cr["apiVersion"], "stablediffusionservices", NS, body["metadata"]["name"])["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    if where is None:
        assert degraded["status"] == "False", f"{case}: {degraded}"
        children = apiserver.children(NS, body["metadata"]["name"])
        assert children and all(
            o["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"] for o in children.values()
        )
    else:
        assert degraded["status"] == "True" and degraded["reason"] in ("InvalidSpec", "ApplyFailed"), degraded
    apiserver.delete(cr["apiVersion"], "stablediffusionservices", NS, body["metadata"]["name"])


def test_the_cli_names_the_field(tmp_path):
    import yaml

    cr = copy.deepcopy(next(doc for name, doc, _ in CORPUS if name == "tolerationSeconds with NoSchedule"))
    path = tmp_path / "cr.yaml"
    path.write_text(yaml.safe_dump(cr))
    out = subprocess.run(
        [sys.executable, "-m", "sdop.cli", "validate", "-f", str(path)], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "spec.scheduling.tolerations[0]" in out.stdout + out.stderr and "NoExecute" in out.stdout + out.stderr
