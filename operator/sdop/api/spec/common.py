"""Pieces several parts of the spec use: Secret and ConfigMap key references, patterns, the scheduler names."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import ApiModel
from ..k8s import DNS_SUBDOMAIN

#: Noise schedulers the inference server offers; "default" keeps the model's own.
#: sdserve has the same list (``sdserve.schedulers``); tests/unit/test_config_contract.py ties the two.
Scheduler = Literal["default", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "lcm"]

QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
DURATION = r"^[0-9]+(ms|s|m|h)$"
#: An IPv4 or IPv6 address or network (CIDR); the exact check is ipaddress's, in the model.
IP_OR_CIDR = r"^[0-9a-fA-F.:]+(/[0-9]{1,3})?$"


class SecretKeyRef(ApiModel):
    """A key of a Secret in the same namespace."""

    name: str = Field(
        description="Name of the Secret.",
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
    )
    key: str = Field(description="Key inside the Secret.", min_length=1, max_length=253)


class ConfigMapKeyRef(ApiModel):
    """A key of a ConfigMap in the same namespace."""

    name: str = Field(
        description="Name of the ConfigMap.",
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
    )
    key: str = Field(description="Key inside the ConfigMap.", min_length=1, max_length=253)
