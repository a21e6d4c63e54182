"""A real kind cluster for the e2e suite: `make e2e` (pytest --run-e2e tests/e2e).

Needs docker, kind and kubectl on PATH. Set SDOP_E2E_CLUSTER to reuse a cluster; otherwise
one named sdop-e2e is created and deleted. The inference image is built for CPU and
loaded into kind, so the tiny model really serves inside the cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from sdtesting.examples import ROOT

IMAGE = "sdop/sdserve:e2e"


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, text=True, capture_output=True, **kw)


@pytest.fixture(scope="session")
def kind_cluster(tmp_path_factory):
    missing = [t for t in ("docker", "kind", "kubectl") if not shutil.which(t)]
    if missing:
        pytest.fail(f"the e2e suite needs {', '.join(missing)} on PATH (and a running Docker engine)")
    name = os.environ.get("SDOP_E2E_CLUSTER", "sdop-e2e")
    created = False
    if name not in sh("kind", "get", "clusters").stdout.split():
        sh("kind", "create", "cluster", "--name", name, "--wait", "120s")
        created = True
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    kubeconfig.write_text(sh("kind", "get", "kubeconfig", "--name", name).stdout)
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    sh(
        "docker",
        "build",
        "-f",
        "inference_image/Dockerfile",
        "-t",
        IMAGE,
        "--build-arg",
        "CUDA_IMAGE=ubuntu:22.04",
        "--build-arg",
        "TORCH_INDEX=https://download.pytorch.org/whl/cpu",
        ".",
        cwd=ROOT,
    )
    sh("kind", "load", "docker-image", IMAGE, "--name", name)
    sh("kubectl", "apply", "--server-side", "-f", str(ROOT / "crds"), env=env)
    sh("kubectl", "wait", "--for=condition=Established", "crd/stablediffusionservices.sdop.io", env=env)
    yield env
    if created and not os.environ.get("SDOP_E2E_KEEP"):
        sh("kind", "delete", "cluster", "--name", name, check=False)


@pytest.fixture(scope="session")
def operator(kind_cluster, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("op") / "operator.log", "w")
    env = dict(
        kind_cluster,
        SDOP_RESYNC_SECONDS="5",
        SDOP_DEFAULT_IMAGE_REPOSITORY="sdop/sdserve",
        SDOP_DEFAULT_IMAGE_TAG="e2e",
        SDOP_METRICS_PORT="0",
        SDOP_LIVENESS_PORT="0",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdop.cli", "operator"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    time.sleep(3)
    yield proc
    proc.terminate()
    proc.wait(30)
