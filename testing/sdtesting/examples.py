"""The repository's paths and its example CRs."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD_FILE = ROOT / "crds" / "stablediffusionservices.sdop.io.yaml"
K8S_VERSIONS = ["1.28", "1.29", "1.30", "1.31", "1.32", "1.33"]


def load_yaml(path: pathlib.Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def example(name: str) -> dict[str, Any]:
    return copy.deepcopy(load_yaml(ROOT / "examples" / f"{name}.yaml"))


def by_kind(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}
