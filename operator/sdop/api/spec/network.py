"""How clients reach the replicas: Service, Ingress, Gateway API HTTPRoute."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import ApiModel, cel
from ..k8s import Annotations, DnsLabel, DnsSubdomain, Hostname, key_rule


class ServiceSpec(ApiModel):
    """The Service in front of the replicas."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(80, description="Service port.", ge=1, le=65535)
    allowed_namespaces: list[DnsLabel] | None = Field(
        None,
        description=(
            "Namespaces whose pods may call the API, besides this one (e.g. the ingress controller's and "
            "Prometheus'). Unset: any source may reach the HTTP port."
        ),
        max_length=32,
    )
    restrict_egress: bool = Field(
        False,
        description=(
            "Let the replicas reach only DNS, HTTPS (model downloads, JWKS, object storage) and the managed Redis."
        ),
    )


class IngressTls(ApiModel):
    secret_name: DnsSubdomain = Field(description="Secret with the TLS certificate for ingress.host.")


class IngressSpec(ApiModel):
    """Optional Ingress."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            ("!self.enabled || has(self.host)", "ingress.host is required when ingress.enabled", ".host")
        )
    }

    enabled: bool = Field(False, description="Render an Ingress.")
    class_name: DnsSubdomain | None = Field(None, description="IngressClass name.")
    host: str | None = Field(None, description="Host name.", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    path: str = Field("/", description="Path prefix.", pattern=r"^/")
    tls: IngressTls | None = Field(None, description="TLS for the host.")
    annotations: Annotations = Field(
        default_factory=dict,
        description="Annotations, e.g. for cert-manager or body size.",
        json_schema_extra=key_rule("ingress.annotations"),
    )

    @model_validator(mode="after")
    def _host(self) -> IngressSpec:
        if self.enabled and not self.host:
            raise ValueError("ingress.host is required when ingress.enabled")
        return self


class ParentRef(ApiModel):
    """A Gateway the HTTPRoute attaches to (Gateway API ParentReference)."""

    name: DnsSubdomain = Field(description="Name of the Gateway.")
    namespace: DnsLabel | None = Field(None, description="Namespace of the Gateway; the service's own when unset.")
    section_name: DnsLabel | None = Field(None, description="Listener of the Gateway to attach to.")


class GatewaySpec(ApiModel):
    """Publish the image API through a Gateway API Gateway: an HTTPRoute (gateway.networking.k8s.io/v1).
    With a canary, the route splits traffic between stable and canary by weight."""

    parent_refs: list[ParentRef] = Field(description="Gateways to attach to.", min_length=1, max_length=32)
    hostnames: list[Hostname] = Field(
        default_factory=list,
        description="Host names the route answers for (any the Gateway accepts when empty).",
        max_length=16,
    )
