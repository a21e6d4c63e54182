"""Shared fixtures: real processes on loopback (sdserve, redis-server), and the opt-ins (e2e, gpu, soak)."""

from __future__ import annotations

from typing import Any

import pytest

from sdtesting.procs import RedisProc, ServerProc


def pytest_addoption(parser):
    parser.addoption("--run-e2e", action="store_true", default=False, help="run tests/e2e against a real kind cluster")
    parser.addoption("--run-gpu", action="store_true", default=False, help="run tests/gpu on a CUDA GPU")
    parser.addoption("--run-soak", action="store_true", default=False, help="run tests/soak (minutes of random load)")


def pytest_ignore_collect(collection_path, config):
    """tests/gpu imports torch on a GPU at collection: left out unless --run-gpu."""
    if collection_path.name == "gpu" and collection_path.parent.name == "tests":
        return not config.getoption("--run-gpu")
    return None


def pytest_collection_modifyitems(config, items):
    opt_in = {
        "e2e": config.getoption("--run-e2e"),
        "gpu": config.getoption("--run-gpu"),
        "soak": config.getoption("--run-soak"),
    }
    deselected = [i for i in items if any(mark in i.keywords and not on for mark, on in opt_in.items())]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [i for i in items if i not in deselected]


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
    for s in started:  # all shut down side by side, then each is waited for
        s.interrupt()
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    r = RedisProc(tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny model, loaded once; the in-process API tests' apps share it."""
    from sdserve.pipeline import Pipeline
    from sdserve.settings import Settings

    p = Pipeline(Settings(model="tiny", min_side=64))
    p.load()
    return p
