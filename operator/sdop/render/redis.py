"""A single managed Redis for the result cache and shared rate limits (cache.redis.managed)."""

from __future__ import annotations

from typing import Any

from ..api.spec.storage import RedisSpec
from .context import Ctx
from .workload import COMPONENT as SERVER
from .workload import container_security_context

COMPONENT = "redis"
REDIS_USER = 999


def _managed(ctx: Ctx) -> RedisSpec | None:
    """The Redis settings when the operator runs the Redis itself."""
    c = ctx.spec.cache
    return c.redis if c.type == "redis" and c.redis is not None and c.redis.managed else None


def redis_deployment(ctx: Ctx) -> dict[str, Any] | None:
    redis = _managed(ctx)
    if redis is None:
        return None
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.meta(ctx.child("redis"), COMPONENT),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": ctx.selector(COMPONENT)},
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": ctx.labels(COMPONENT)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": REDIS_USER,
                        "runAsGroup": REDIS_USER,
                        "fsGroup": REDIS_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "redis",
                            "image": redis.image,
                            # No persistence, bounded memory. Under memory pressure only keys with an
                            # expiry go, least recently used first: cached results and rate-limit
                            # buckets. Async jobs' records carry none (sdserve.jobs.redisstore.RedisJobs keeps
                            # their expiry apart), so an accepted job is never evicted.
                            "args": [
                                "--save",
                                "",
                                "--appendonly",
                                "no",
                                "--maxmemory",
                                "768mb",
                                "--maxmemory-policy",
                                "volatile-lru",
                            ],
                            "ports": [{"name": "redis", "containerPort": 6379, "protocol": "TCP"}],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "1Gi"},
                                "limits": {"cpu": "1", "memory": "1Gi"},
                            },
                            "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
                            "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10},
                            "securityContext": container_security_context(),
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        }
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }


def redis_service(ctx: Ctx) -> dict[str, Any] | None:
    if not _managed(ctx):
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.meta(ctx.child("redis"), COMPONENT),
        "spec": {
            "selector": ctx.selector(COMPONENT),
            "ports": [{"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}],
        },
    }


def redis_network_policy(ctx: Ctx) -> dict[str, Any] | None:
    if not _managed(ctx):
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": ctx.meta(ctx.child("redis"), COMPONENT),
        "spec": {
            "podSelector": {"matchLabels": ctx.selector(COMPONENT)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": ctx.selector(SERVER)}}],
                    "ports": [{"port": 6379, "protocol": "TCP"}],
                }
            ],
        },
    }
