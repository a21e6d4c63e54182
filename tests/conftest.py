"""Shared fixtures: real processes on loopback (sdserve, redis-server), and the e2e opt-in."""

from __future__ import annotations

from typing import Any

import pytest

from sdtesting.procs import RedisProc, ServerProc


def pytest_addoption(parser):
    parser.addoption("--run-e2e", action="store_true", default=False, help="run tests/e2e against a real kind cluster")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-e2e"):
        return
    deselected = [i for i in items if "e2e" in i.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [i for i in items if "e2e" not in i.keywords]


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    started: list[ServerProc] = []

    def start(wait: str | None = "/readyz", **settings: Any) -> ServerProc:
        s = ServerProc(tmp_path_factory.mktemp("sdserve"), **settings)
        started.append(s)
        if wait:
            s.wait(wait)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    r = RedisProc(tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()
