"""Alert rules and dashboard: promtool checks and unit tests, runbook links, valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from sdop.render import render
from sdop.render.dashboard import dashboard_model
from sdtesting.examples import EXAMPLES, ROOT, example, load_yaml

PROMTOOL_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool is not installed: `make test` installs Debian's prometheus package")
    return path


def rule_spec(cr):
    return next(o for o in render(cr) if o["kind"] == "PrometheusRule")["spec"]


def write_rules(tmp_path, cr):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec(cr), width=400))
    shutil.copy(PROMTOOL_TESTS, tmp_path / "alerts_test.yaml")


@pytest.mark.parametrize(
    "path",
    [p for p in EXAMPLES if any(o["kind"] == "PrometheusRule" for o in render(load_yaml(p)))],
    ids=lambda p: p.name,
)
def test_promtool_check_rules_accepts_rendered_rules(promtool, tmp_path, path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec(load_yaml(path)), width=400))
    r = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 11 rules found" in r.stdout


def test_promtool_unit_tests_each_alert_fires_and_stays_silent(promtool, tmp_path):
    write_rules(tmp_path, example("sd15-production"))
    r = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_fail_when_a_threshold_moves(promtool, tmp_path):
    """The unit tests really depend on the CR's thresholds (they can fail)."""
    cr = example("sd15-production")
    cr["spec"]["monitoring"]["thresholds"]["gpuTemperatureCelsius"] = 95
    write_rules(tmp_path, cr)
    r = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "SDGpuTemperatureHigh" in r.stdout + r.stderr


def test_every_alert_has_severity_summary_description_and_a_runbook_section():
    anchors = {
        re.sub(r"[^a-z0-9-]", "", line[3:].strip().lower())
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    rules = rule_spec(example("sd15-production"))["groups"][0]["rules"]
    assert len(rules) == 11
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        anchor = rule["annotations"]["runbook_url"].split("#")[1]
        assert anchor in anchors, rule["alert"]


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    model = dashboard_model()
    exprs = [t["expr"] for p in model["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    rules = [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$namespace", "ns").replace("$service", "svc")}
        for i, e in enumerate(exprs)
    ]
    (tmp_path / "dash.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, width=400))
    r = subprocess.run([promtool, "check", "rules", str(tmp_path / "dash.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_covers_the_questions_and_is_delivered_with_the_sidecar_label():
    titles = " ".join(p["title"].lower() for p in dashboard_model()["panels"])
    for word in (
        "request rate",
        "latency",
        "queue depth",
        "batch size",
        "cache hit",
        "gpu temperature",
        "gpu memory",
        "gpu utilisation",
        "replicas",
    ):
        assert word in titles, word
    cm = next(o for o in render(example("sd15-production")) if o["metadata"]["name"] == "sd15-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    model = json.loads(cm["data"]["sdop-images-sd15.json"])
    assert model["uid"].startswith("sdop-") and "images/sd15" in model["title"]
