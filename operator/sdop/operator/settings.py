"""Operator settings, from SDOP_* environment variables (the Helm chart sets them)."""

from __future__ import annotations

import socket
import uuid
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..api import DEFAULT_IMAGE_REPOSITORY, DEFAULT_IMAGE_TAG


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDOP_", extra="ignore")

    namespaces: str = Field("", description="Comma-separated namespaces (globs allowed) to watch; empty: cluster-wide.")
    default_image_repository: str = DEFAULT_IMAGE_REPOSITORY
    default_image_tag: str = DEFAULT_IMAGE_TAG
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    resync_seconds: float = Field(60, gt=0, description="How often every service is checked for drift.")
    leader_election: bool = Field(
        False,
        description="Run only while holding a coordination.k8s.io Lease, so one of several replicas reconciles.",
    )
    lease_name: str = Field("sdop-operator", description="Name of the leader election Lease.")
    lease_namespace: str = Field("", description="Namespace of the Lease; the pod's namespace (default) when empty.")
    identity: str = Field("", description="This replica's identity in the Lease; the pod name when empty.")
    max_concurrent_reconciles: int = Field(
        16, ge=1, le=1000, description="Reconciles running at once; the rest wait their turn."
    )
    metrics_port: int = Field(8081, ge=0, description="Port of the operator's /metrics; 0 turns it off.")
    liveness_port: int = Field(8080, ge=0, description="Port of /healthz; 0 turns it off.")

    @property
    def lease_namespace_or_default(self) -> str:
        return self.lease_namespace or "default"

    @property
    def identity_or_default(self) -> str:
        return self.identity or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"

    @property
    def namespace_list(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]
