"""Who may call the API and how often: API keys, JWTs, rate limits, webhook hosts."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..base import ApiModel, cel
from ..k8s import Hostname
from .common import IP_OR_CIDR, SecretKeyRef

JwtAlgorithm = Literal["HS256", "RS256", "ES256"]


def _default_jwt_algorithms() -> list[JwtAlgorithm]:
    return ["RS256"]


class JwtSpec(ApiModel):
    """JSON Web Token validation."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "has(self.jwksUrl) != has(self.keySecretRef)",
                "set exactly one of auth.jwt.jwksUrl and auth.jwt.keySecretRef",
                None,
            )
        )
    }

    issuer: str = Field(description="Required iss claim.", min_length=1)
    audience: str = Field(description="Required aud claim.", min_length=1)
    jwks_url: str | None = Field(
        None, description="JWKS endpoint of the issuer (RS256/ES256 keys).", pattern=r"^https?://"
    )
    key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key with an HS256 shared secret or a PEM public key."
    )
    algorithms: list[JwtAlgorithm] = Field(
        default_factory=_default_jwt_algorithms, description="Accepted signing algorithms.", min_length=1
    )

    @model_validator(mode="after")
    def _key(self) -> JwtSpec:
        if (self.jwks_url is None) == (self.key_secret_ref is None):
            raise ValueError("set exactly one of auth.jwt.jwksUrl and auth.jwt.keySecretRef")
        return self


class AuthSpec(ApiModel):
    """Who may call the API; open when neither is set."""

    api_keys_secret_ref: SecretKeyRef | None = Field(
        None,
        description=(
            "Secret key with API keys, one per line (optionally 'name:key'). Running replicas apply an edit within "
            "about a minute (no restart); a Secret that holds no key refuses every request."
        ),
    )
    jwt: JwtSpec | None = Field(None, description="Accept bearer JWTs.")


class RateLimitSpec(ApiModel):
    """Token bucket per API key (or client address when auth is off)."""

    enabled: bool = Field(False, description="Enforce the limit.")
    requests_per_second: float = Field(2.0, description="Sustained requests per second per key.", gt=0, le=10000)
    burst: int = Field(10, description="Requests a key may make at once.", ge=1, le=100000)
    trusted_proxies: list[Annotated[str, Field(pattern=IP_OR_CIDR, max_length=49)]] = Field(
        default_factory=list,
        description=(
            "Addresses or CIDRs of the proxies in front of the service (the ingress controller or gateway pods): "
            "their X-Forwarded-For names the client an anonymous request is limited as. Unset: only the pod's "
            "own loopback is trusted, so behind a proxy every anonymous client shares the proxy's bucket."
        ),
        max_length=32,
    )

    @model_validator(mode="after")
    def _networks(self) -> RateLimitSpec:
        for i, address in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise ValueError(f"rateLimit.trustedProxies[{i}]: {address!r} is not an IP address or CIDR") from None
        return self


class WebhooksSpec(ApiModel):
    """Where async jobs' webhooks may go (POST /v1/jobs with a webhook)."""

    allowed_hosts: list[Hostname] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Hosts a job's webhook URL may name ('*.example.com' for any subdomain). Empty: webhooks are refused; "
            "a webhook open to any host would let clients make the server call inside the cluster. With "
            "service.restrictEgress, only HTTPS (443) leaves the pods."
        ),
    )
