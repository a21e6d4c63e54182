"""The ConfigMap of server settings: SDSERVE_* names read by sdserve.settings.Settings."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from ..api import quantity
from ..api.semantics import max_sides
from ..api.spec.model import ModelSpec
from .context import HF_CACHE_MOUNT, HTTP_PORT, Ctx

AUTH_DIR = "/etc/sdserve/auth"
SAFETY_DIR = "/etc/sdserve/safety"
MODEL_PVC_DIR = "/models"
HF_HOME = HF_CACHE_MOUNT


def model_location(m: ModelSpec) -> str:
    """What SDSERVE_MODEL says for a model block: its id, path, or the PVC's mount."""
    if m.id is not None:
        return m.id
    if m.path is not None:
        return m.path
    assert m.pvc is not None, "ModelSpec allows exactly one of id, path and pvc"
    sub = m.pvc.sub_path.strip("/")
    return f"{MODEL_PVC_DIR}/{sub}" if sub else MODEL_PVC_DIR


def settings_env(ctx: Ctx) -> dict[str, str]:
    s = ctx.spec
    env: dict[str, Any] = {
        "SDSERVE_MODEL": model_location(s.model),
        "SDSERVE_MODEL_REVISION": s.model.revision,
        "SDSERVE_PIPELINE": s.model.pipeline,
        "SDSERVE_DTYPE": s.model.dtype,
        "SDSERVE_DEVICE": "cuda" if s.gpu.count > 0 else "cpu",
        "SDSERVE_COMPILE": s.server.compile,
        "SDSERVE_CHANNELS_LAST": s.server.channels_last,
        "SDSERVE_SCHEDULER": s.server.scheduler,
        "SDSERVE_NSFW_CHECK": s.safety.nsfw_check,
        "SDSERVE_MAX_BATCH_SIZE": ctx.max_batch_size,
        "SDSERVE_MAX_WAIT_MS": s.batching.max_wait_ms,
        "SDSERVE_BATCHING": s.batching.mode,
        # Latent pixels one UNet forward may hold: the preset's batch of 512x512 images.
        "SDSERVE_STEP_BUDGET": ctx.max_batch_size * 64 * 64,
        "SDSERVE_QUANTIZATION": s.server.quantization,
        "SDSERVE_QUEUE_SIZE": s.limits.queue_size,
        "SDSERVE_TIMEOUT_SECONDS": s.limits.timeout_seconds,
        "SDSERVE_MIN_SIDE": s.limits.min_side,
        "SDSERVE_MAX_WIDTH": max_sides(s)[0],
        "SDSERVE_MAX_HEIGHT": max_sides(s)[1],
        "SDSERVE_MAX_STEPS": s.limits.max_steps,
        "SDSERVE_MAX_IMAGES": s.limits.max_images,
        "SDSERVE_MAX_PROMPT_LENGTH": s.limits.max_prompt_length,
        "SDSERVE_CACHE_TYPE": s.cache.type,
        "SDSERVE_CACHE_MAX_ENTRIES": s.cache.max_entries,
        "SDSERVE_CACHE_TTL_SECONDS": s.cache.ttl_seconds,
        "SDSERVE_RATE_LIMIT_ENABLED": s.rate_limit.enabled,
        "SDSERVE_RATE_LIMIT_RPS": s.rate_limit.requests_per_second,
        "SDSERVE_RATE_LIMIT_BURST": s.rate_limit.burst,
        "SDSERVE_WEBHOOK_ALLOWED_HOSTS": ",".join(s.webhooks.allowed_hosts),
        "SDSERVE_LOG_LEVEL": s.server.log_level,
        "SDSERVE_PORT": HTTP_PORT,
        # Leave a margin inside the grace period for the final responses.
        "SDSERVE_DRAIN_SECONDS": max(5, s.rollout.termination_grace_period_seconds - 15),
        # A model that cannot load: the reason goes to the termination message and the container
        # exits, so the pod's status (and the StableDiffusionService's) names it within a minute.
        "SDSERVE_TERMINATION_LOG": "/dev/termination-log",
        "SDSERVE_EXIT_AFTER_LOAD_FAILURE_SECONDS": 30,
    }
    if ctx.is_canary:
        stable = model_location(ctx.plan.stable)
        if stable != env["SDSERVE_MODEL"]:  # only when set, as below
            # Clients that name the stable model (the Images API's ``model``) are served by
            # the canary their share of requests goes to, not refused there.
            env["SDSERVE_MODEL_ALIASES"] = stable
        # Jobs handed off (a stable replica shutting down) or lost stay on the stable model:
        # the canary serves its share of the traffic, and counts for no share of those jobs.
        env["SDSERVE_JOB_ADOPT"] = False
    if s.server.compile_mode is not None:  # only when set, as below
        env["SDSERVE_COMPILE_MODE"] = s.server.compile_mode
    if s.server.stall_seconds is not None:  # only when set, as below
        env["SDSERVE_STALL_SECONDS"] = s.server.stall_seconds
    if s.rate_limit.trusted_proxies:  # only when set, as below
        # As networks uvicorn parses strictly: "10.0.0.1/8" would otherwise match nothing.
        networks = (ipaddress.ip_network(a, strict=False) for a in s.rate_limit.trusted_proxies)
        env["SDSERVE_FORWARDED_ALLOW_IPS"] = ",".join(str(n) for n in networks)
    if s.cache.max_memory is not None:  # only when set, as below
        env["SDSERVE_CACHE_MAX_BYTES"] = int(quantity.value(s.cache.max_memory) or 0)
    d = s.defaults  # each only when set, as below
    if d.size is not None:
        env["SDSERVE_DEFAULT_SIZE"] = f"{d.size.width}x{d.size.height}"
    if d.steps is not None:
        env["SDSERVE_DEFAULT_STEPS"] = d.steps
    if d.guidance_scale is not None:
        env["SDSERVE_DEFAULT_GUIDANCE_SCALE"] = d.guidance_scale
    if d.negative_prompt is not None:
        env["SDSERVE_DEFAULT_NEGATIVE_PROMPT"] = d.negative_prompt
    if s.server.warmup_sizes:  # only when set: a new key would roll every existing service on upgrade
        env["SDSERVE_WARMUP_SIZES"] = ",".join(f"{z.width}x{z.height}" for z in s.server.warmup_sizes)
    if s.model.loras:
        env["SDSERVE_LORAS"] = json.dumps(
            [
                {"name": a.name, "source": a.id or a.path, "weight_name": a.weight_name, "weight": a.weight}
                for a in s.model.loras
            ],
            separators=(",", ":"),
        )
    if s.outputs.s3:
        o = s.outputs.s3
        env.update(
            {
                "SDSERVE_S3_BUCKET": o.bucket,
                "SDSERVE_S3_REGION": o.region,
                "SDSERVE_S3_PREFIX": o.prefix,
                "SDSERVE_S3_PATH_STYLE": o.path_style,
                "SDSERVE_S3_URL_EXPIRY_SECONDS": o.url_expiry_seconds,
            }
        )
        if o.endpoint:
            env["SDSERVE_S3_ENDPOINT"] = o.endpoint
    if s.model.variant:
        env["SDSERVE_VARIANT"] = s.model.variant
    if s.auth.api_keys_secret_ref:
        env["SDSERVE_API_KEYS_FILE"] = f"{AUTH_DIR}/api-keys"
    if s.auth.jwt:
        j = s.auth.jwt
        env["SDSERVE_JWT_ISSUER"] = j.issuer
        env["SDSERVE_JWT_AUDIENCE"] = j.audience
        env["SDSERVE_JWT_ALGORITHMS"] = ",".join(j.algorithms)
        if j.jwks_url:
            env["SDSERVE_JWT_JWKS_URL"] = j.jwks_url
        else:
            env["SDSERVE_JWT_KEY_FILE"] = f"{AUTH_DIR}/jwt-key"
    if s.safety.blocklist_config_map_ref:
        env["SDSERVE_BLOCKLIST_FILE"] = f"{SAFETY_DIR}/blocklist"
    if s.safety.checker:
        env["SDSERVE_SAFETY_CHECKER"] = s.safety.checker
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in sorted(env.items())}


def configmap(ctx: Ctx) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": ctx.meta(ctx.config_name, "server"),
        "data": settings_env(ctx),
    }
