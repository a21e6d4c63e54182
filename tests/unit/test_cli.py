"""The sdop CLI: render/validate/crd with clear errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import yaml

from sdtesting.examples import CRD_FILE, ROOT


def sdop(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "sdop.cli", *args], capture_output=True, text=True, input=stdin, cwd=ROOT
    )


def test_render_prints_multi_document_yaml():
    r = sdop("render", "-f", "examples/sd15-production.yaml")
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PrometheusRule"}


def test_crd_command_prints_committed_crd():
    r = sdop("crd")
    assert r.returncode == 0 and r.stdout == CRD_FILE.read_text()


def test_validate_reports_field_path_and_fails():
    bad = (ROOT / "examples" / "minimal.yaml").read_text() + "  replicas: {min: 3, max: 1}\n  gpu: {type: tpu}\n"
    r = sdop("validate", "-f", "-", stdin=bad)
    assert r.returncode == 1
    assert "spec.gpu.type" in r.stderr and "spec.replicas" in r.stderr


def test_render_of_semantic_conflict_fails_naming_field():
    bad = (ROOT / "examples" / "minimal.yaml").read_text() + "  batching: {maxBatchSize: 40}\n"
    r = sdop("render", "-f", "-", stdin=bad)
    assert r.returncode == 1 and "spec.batching.maxBatchSize" in r.stderr and r.stdout == ""


def test_missing_file_and_bad_yaml_are_clear_errors():
    r = sdop("render", "-f", "nope.yaml")
    assert r.returncode != 0 and "cannot read nope.yaml" in r.stderr
    r = sdop("validate", "-f", "-", stdin="a: [b\n")
    assert r.returncode != 0 and "not valid YAML" in r.stderr
