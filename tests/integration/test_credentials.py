"""The operator's credentials as on EKS/GKE/AKS and in a pod: an exec credential plugin, and a
token file that rotates (the API server then refuses the old token). Both the operator's
own client and kopf's login reach the test API server with the right bearer token."""

from __future__ import annotations

import json
import sys

import pytest

from sdop.operator.handlers import login
from sdop.operator.memo import Memo
from sdop.operator.settings import OperatorSettings
from sdop.reconcile.kube import Kube

pytestmark = pytest.mark.integration


def kubeconfig(path, server: str, user: dict) -> str:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture
def auth(apiserver):
    apiserver.api.seen_tokens.clear()
    yield apiserver.api
    apiserver.api.tokens = None


async def test_an_exec_plugin_kubeconfig_reaches_the_server_with_its_token(apiserver, auth, tmp_path, monkeypatch):
    plugin = tmp_path / "plugin.py"
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "from-the-plugin", "expirationTimestamp": "2099-01-01T00:00:00Z"},
    }
    plugin.write_text(f"import json\nprint(json.dumps({credential!r}))\n")
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(plugin)],
            "interactiveMode": "Never",
        }
    }
    monkeypatch.setenv("KUBECONFIG", kubeconfig(tmp_path / "config", apiserver.url, user))
    auth.tokens = {"from-the-plugin"}
    kube = Kube()
    try:
        assert await kube.list("v1", "ConfigMap", "default", {}) == []
    finally:
        await kube.close()
    assert auth.seen_tokens[-1] == "from-the-plugin"
    info = await login(memo=Memo.build(OperatorSettings(), kube=Kube()))
    assert info.token == "from-the-plugin" and info.server == apiserver.url


async def test_a_rotated_token_file_is_read_again_after_a_401(apiserver, auth, tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("first")
    monkeypatch.setenv("KUBECONFIG", kubeconfig(tmp_path / "config", apiserver.url, {"tokenFile": str(token)}))
    auth.tokens = {"first"}
    kube = Kube()
    memo = Memo.build(OperatorSettings(), kube=Kube())
    try:
        await kube.list("v1", "ConfigMap", "default", {})
        assert (await login(memo=memo)).token == "first"
        # The token rotates: the file holds a new one and the server refuses the old one.
        token.write_text("second")
        auth.tokens = {"second"}
        await kube.list("v1", "ConfigMap", "default", {})  # 401, credentials loaded again, retried
        assert auth.seen_tokens[-2:] == ["first", "second"]
        assert (await login(memo=memo)).token == "second"  # what kopf gets when it logs in again
    finally:
        await kube.close()
        await memo.kube.close()
