"""Real processes on loopback: an sdserve server, a redis-server, the operator."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """A real `sdserve serve` process with the tiny model."""

    def __init__(self, tmp_path, **settings: Any):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The batching mode is the one setting the environment passes on: `make test` runs the
        # server tests once per mode (SDSERVE_BATCHING=request, then step).
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_") or k == "SDSERVE_BATCHING"}
        env.update(
            {
                "SDSERVE_MODEL": "tiny",
                "SDSERVE_MIN_SIDE": "64",
                "SDSERVE_LOG_LEVEL": "info",
                "SDSERVE_HOST": "127.0.0.1",
                "SDSERVE_PORT": str(self.port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(
            {f"SDSERVE_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}
        )
        self.log_path = tmp_path / f"sdserve-{self.port}.log"
        self._log = open(self.log_path, "w")
        self._interrupted = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdserve", "serve"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait(self, path: str = "/readyz", timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdserve exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"sdserve not answering {path}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def interrupt(self) -> None:
        """Ask it to shut down (Ctrl-C) without waiting: several servers stop side by side.
        Once: a second Ctrl-C would make uvicorn quit at once instead of draining."""
        if self.proc.poll() is None and not self._interrupted:
            self._interrupted = True
            self.proc.send_signal(signal.SIGINT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class RedisProc:
    def __init__(self, tmp_path):
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed: run `make test`, which installs Debian's redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        self.client = client

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class OperatorProc:
    """`sdop operator` in its own process, against the API server a kubeconfig points at."""

    def __init__(self, kubeconfig: str, tmp_path: pathlib.Path, *, verbose: bool = True, **settings: Any):
        self.log_path = tmp_path / "operator.log"
        self.metrics_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDOP_")}
        env.update(KUBECONFIG=kubeconfig, SDOP_METRICS_PORT=str(self.metrics_port), SDOP_LIVENESS_PORT="0")
        env.update({f"SDOP_{k.upper()}": str(v) for k, v in settings.items()})
        env["PYTHONUNBUFFERED"] = "1"
        self._log = open(self.log_path, "w")
        args = [sys.executable, "-m", "sdop.cli", "operator", *(["--verbose"] if verbose else [])]
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(30)
        self._log.close()
        return code

    def kill(self) -> None:
        """Die without cleaning up (no peering goodbye), as a crashed or evicted pod does."""
        self.proc.kill()
        self.proc.wait(30)
        self._log.close()


class PrometheusProc:
    """Debian's `prometheus`, scraping the given jobs every second."""

    def __init__(
        self, tmp_path: pathlib.Path, scrape_configs: list[dict[str, Any]], rule_files: tuple[str, ...] | list[str] = ()
    ):
        import yaml

        if not shutil.which("prometheus"):
            raise RuntimeError("prometheus is not installed: `make test` installs Debian's prometheus package")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": list(rule_files),
            "scrape_configs": scrape_configs,
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "prometheus.log"
        self._log = open(self.log_path, "w")
        port = free_port()
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(self.log_path.read_text())

    def query(self, q: str) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": q}, timeout=10).json()
        assert r["status"] == "success", r
        result: list[dict[str, Any]] = r["data"]["result"]
        return result

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._log.close()


class S3Proc:
    """An S3-protocol server on loopback: moto in server mode (a real HTTP server speaking the
    S3 API, signatures checked), with one bucket."""

    ACCESS_KEY, SECRET_KEY = "test-access-key", "test-secret-key"

    def __init__(self, tmp_path, bucket: str = "images", port: int | None = None):
        self.port = port or free_port()  # a port: a store coming back where one went away
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self._log = open(tmp_path / f"moto-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url + "/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (tmp_path / f"moto-{self.port}.log").read_text()
                    raise RuntimeError(f"moto server did not start: {log}") from None
                time.sleep(0.1)
        self.client().create_bucket(Bucket=bucket)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
        )

    def settings(self, prefix: str = "out/") -> dict[str, Any]:
        """The sdserve settings that point at this store."""
        return {
            "s3_bucket": self.bucket,
            "s3_endpoint": self.url,
            "s3_prefix": prefix,
            "s3_path_style": True,
            "s3_access_key_id": self.ACCESS_KEY,
            "s3_secret_access_key": self.SECRET_KEY,
        }

    def keys(self) -> list[str]:
        return [o["Key"] for o in self.client().list_objects_v2(Bucket=self.bucket).get("Contents", [])]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self._log.close()
