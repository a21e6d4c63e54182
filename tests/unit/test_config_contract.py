"""The operator's ConfigMap and the server's Settings name the same things."""

from __future__ import annotations

import pytest

from sdop.render import render
from sdserve.settings import Settings, env_names
from sdtesting.examples import EXAMPLES, load_yaml


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_rendered_setting_is_read_by_the_server(path, monkeypatch):
    cr = load_yaml(path)
    objs = render(cr)
    dep = next(
        o
        for o in objs
        if o["kind"] == "Deployment" and o["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
    )
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config"))
    env = dict(cm["data"])
    extra_env = [e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]]
    unknown = (set(env) | {n for n in extra_env if n.startswith("SDSERVE_")}) - env_names()
    assert unknown == set()
    # The server accepts the rendered values as they are (secrets filled with placeholders).
    for name in extra_env:
        if name.startswith("SDSERVE_"):
            env[name] = "redis://redis:6379/0" if name == "SDSERVE_REDIS_URL" else "x"
    for name, value in env.items():  # read from the environment, as the server reads its ConfigMap
        monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert settings.max_batch_size == int(cm["data"]["SDSERVE_MAX_BATCH_SIZE"])
    assert settings.queue_size == int(cm["data"]["SDSERVE_QUEUE_SIZE"])
    assert [a.name for a in settings.loras] == [a["name"] for a in cr["spec"].get("model", {}).get("loras", [])]


def test_the_crd_and_the_server_offer_the_same_schedulers():
    from typing import get_args

    from sdop.api.spec.common import Scheduler
    from sdserve.schedulers import NAMES

    assert get_args(Scheduler) == NAMES
