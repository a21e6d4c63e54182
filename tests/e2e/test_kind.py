"""The operator scenarios on a real cluster (kind), with the tiny model really serving."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from sdtesting.examples import ROOT

pytestmark = pytest.mark.e2e
NS = "default"


def kubectl(env, *args, check=True):
    return subprocess.run(["kubectl", *args], env=env, text=True, capture_output=True, check=check)


def get(env, kind, name):
    r = kubectl(env, "get", kind, name, "-n", NS, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def wait_until(fn, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return
        time.sleep(2)
    raise AssertionError("timed out")


def test_tiny_service_becomes_ready_and_serves(kind_cluster, operator):
    env = kind_cluster
    kubectl(env, "apply", "-f", str(ROOT / "examples" / "tiny-cpu.yaml"))
    kubectl(env, "wait", "--for=condition=Ready", "sds/sd-tiny", "--timeout=600s")
    sds = get(env, "sds", "sd-tiny")
    assert sds["status"]["readyReplicas"] >= 1
    dep = get(env, "deployment", "sd-tiny")
    assert dep["metadata"]["ownerReferences"][0]["uid"] == sds["metadata"]["uid"]
    out = kubectl(
        env,
        "run",
        "curl",
        "--rm",
        "-i",
        "--restart=Never",
        "--image=curlimages/curl",
        "--",
        "curl",
        "-s",
        "-X",
        "POST",
        "http://sd-tiny/generate",
        "-H",
        "content-type: application/json",
        "-d",
        '{"prompt":"e2e","width":256,"height":256,"num_inference_steps":2}',
    )
    assert '"images"' in out.stdout


def test_deleted_deployment_comes_back(kind_cluster, operator):
    env = kind_cluster
    uid = get(env, "deployment", "sd-tiny")["metadata"]["uid"]
    kubectl(env, "delete", "deployment", "sd-tiny", "-n", NS)
    wait_until(lambda: (get(env, "deployment", "sd-tiny") or {}).get("metadata", {}).get("uid") not in (None, uid), 120)


def test_spec_change_and_prune(kind_cluster, operator):
    env = kind_cluster
    kubectl(
        env,
        "patch",
        "sds",
        "sd-tiny",
        "-n",
        NS,
        "--type=merge",
        "-p",
        '{"spec":{"ingress":{"enabled":true,"host":"tiny.local"},"limits":{"queueSize":10}}}',
    )
    wait_until(lambda: get(env, "ingress", "sd-tiny") is not None, 60)
    wait_until(lambda: get(env, "configmap", "sd-tiny-config")["data"]["SDSERVE_QUEUE_SIZE"] == "10", 60)
    kubectl(env, "patch", "sds", "sd-tiny", "-n", NS, "--type=merge", "-p", '{"spec":{"ingress":{"enabled":false}}}')
    wait_until(lambda: get(env, "ingress", "sd-tiny") is None, 60)


def test_invalid_spec_rejected_by_api_server(kind_cluster):
    bad = (
        "apiVersion: sdop.io/v1alpha1\nkind: StableDiffusionService\nmetadata: {name: bad}\n"
        "spec:\n  model: {id: tiny}\n  replicas: {min: 3, max: 1}\n"
    )
    r = subprocess.run(["kubectl", "apply", "-f", "-"], env=kind_cluster, text=True, capture_output=True, input=bad)
    assert r.returncode != 0 and "replicas.min must be <= replicas.max" in r.stderr


def test_deleting_the_service_garbage_collects_children(kind_cluster):
    env = kind_cluster
    kubectl(env, "delete", "sds", "sd-tiny", "-n", NS, "--wait=true", "--timeout=120s")
    wait_until(lambda: get(env, "deployment", "sd-tiny") is None and get(env, "service", "sd-tiny") is None, 120)
