"""The Helm chart renders and lints clean with real Helm (Helm's Go SDK through helm-python)."""

from __future__ import annotations

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from sdtesting.examples import K8S_VERSIONS, ROOT

CHART = ROOT / "charts" / "sdop"
SETUPS = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "ha": {
        "replicaCount": 2,
        "leaderElection": {"enabled": True, "leaseName": "sdop-operator"},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
}
NOT_BUILTIN = {"ServiceMonitor"}


def rendered(values):
    out = helm.Chart.load(CHART).render(values, name="sdop", namespace="sdop-system", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.mark.parametrize("setup", SETUPS)
def test_chart_lints_clean_in_strict_mode(setup):
    report = helm.lint(str(CHART), SETUPS[setup], strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("setup", SETUPS)
def test_rendered_chart_validates_against_kubernetes_schemas(setup, version):
    docs = rendered(SETUPS[setup])
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"} <= {d["kind"] for d in docs}
    for d in docs:
        if d["kind"] not in NOT_BUILTIN:
            kubernetes_validate.validate(d, version, strict=True)


@pytest.mark.parametrize("setup", SETUPS)
def test_rbac_is_least_privilege_without_wildcards(setup):
    for d in rendered(SETUPS[setup]):
        for rule in d.get("rules", []) if d["kind"] in ("Role", "ClusterRole") else []:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), (d["metadata"]["name"], rule)
            assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"]


def test_namespaced_mode_uses_roles_in_each_namespace_and_no_cluster_write_role():
    docs = rendered(SETUPS["namespaced"])
    roles = [d for d in docs if d["kind"] == "Role" and not d["metadata"]["name"].endswith("-leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    (lease_role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leader-election")]
    assert lease_role["metadata"]["namespace"] == "sdop-system"
    assert lease_role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    ]
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert len(cluster_roles) == 1
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in cluster_roles[0]["rules"])
    env = {
        e["name"]: e.get("value")
        for e in next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["SDOP_NAMESPACES"] == "team-a,team-b"


def test_operator_pod_is_restricted_and_settings_are_wired():
    dep = next(d for d in rendered({}) if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["capabilities"] == {
        "drop": ["ALL"]
    }
    env = {e["name"] for e in c["env"]}
    from sdop.operator.settings import OperatorSettings

    assert env == {f"SDOP_{n.upper()}" for n in OperatorSettings.model_fields}


@pytest.mark.parametrize(
    "values,message",
    [
        ({"replicaCount": 2, "leaderElection": {"enabled": False}}, "leaderElection"),
        ({"logLevel": "verbose"}, "logLevel"),
        ({"watchNamespaces": ["Bad_Name"]}, "watchNamespaces"),
        ({"unknownKey": 1}, "unknownKey"),
    ],
)
def test_values_schema_rejects_bad_values(values, message):
    with pytest.raises(helm.HelmValuesError) as e:
        helm.Chart.load(CHART).validate_schema(values)
    assert message in str(e.value)


def test_chart_ships_the_crds():
    chart = helm.Chart.load(CHART)
    names = {c["name"] for c in chart.crds}
    assert any("stablediffusionservices.sdop.io.yaml" in n for n in names)


def _grants(setup: str) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, over every Role and ClusterRole the chart renders."""
    out: dict[tuple[str, str], set[str]] = {}
    for d in rendered(SETUPS[setup]):
        if d["kind"] not in ("Role", "ClusterRole"):
            continue
        for rule in d.get("rules", []):
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize("setup", SETUPS)
def test_rbac_covers_exactly_the_kinds_table(setup):
    """Derived from sdop.api.kinds: every managed kind can be read, applied and pruned; nothing else is writable
    beyond our own resource, its status, Events and the leader election Lease."""
    from sdop.api import GROUP, MANAGED, PLURAL

    grants = _grants(setup)
    for row in MANAGED:
        verbs = grants.get((row.group, row.plural), set())
        missing = {"get", "list", "watch", "create", "patch", "delete"} - verbs
        assert not missing, f"{row.kind}: the chart's RBAC lacks {sorted(missing)} on {row.group}/{row.plural}"
    allowed = {(row.group, row.plural) for row in MANAGED} | {
        (GROUP, PLURAL),
        (GROUP, f"{PLURAL}/status"),
        (GROUP, f"{PLURAL}/finalizers"),
        ("", "events"),
        ("events.k8s.io", "events"),
        ("coordination.k8s.io", "leases"),
        ("", "pods"),
        ("apps", "replicasets"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("", "namespaces"),
    }
    extra = set(grants) - allowed
    assert not extra, f"RBAC grants resources no row of sdop.api.kinds needs: {sorted(extra)}"


@pytest.mark.parametrize("setup", SETUPS)
def test_children_may_block_their_owners_deletion(setup):
    """blockOwnerDeletion on the children's owner references needs update on the owner's finalizers
    (OwnerReferencesPermissionEnforcement, enabled on most clusters)."""
    from sdop.api import GROUP, PLURAL

    assert "update" in _grants(setup).get((GROUP, f"{PLURAL}/finalizers"), set())
