"""The StableDiffusionService API: pydantic models, the one definition of every field."""

from . import quantity
from .kinds import (
    CUSTOM_METRICS_API,
    GATEWAY_API,
    KEDA_API,
    KEDA_HTTP_API,
    KINDS,
    MANAGED,
    MONITORING_API,
    OPTIONAL_APIS,
    Kind,
    kind_of,
)
from .resource import (
    API_VERSION,
    FIELD_MANAGER,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    SpecError,
    StableDiffusionService,
    parse,
)
from .spec import DEFAULT_IMAGE_REPOSITORY, DEFAULT_IMAGE_TAG, StableDiffusionServiceSpec
from .status import StableDiffusionServiceStatus
from .validate import load

__all__ = [
    "API_VERSION",
    "CUSTOM_METRICS_API",
    "DEFAULT_IMAGE_REPOSITORY",
    "DEFAULT_IMAGE_TAG",
    "FIELD_MANAGER",
    "GATEWAY_API",
    "GROUP",
    "KEDA_API",
    "KEDA_HTTP_API",
    "KIND",
    "KINDS",
    "MANAGED",
    "MONITORING_API",
    "OPTIONAL_APIS",
    "PLURAL",
    "VERSION",
    "Kind",
    "SpecError",
    "StableDiffusionService",
    "StableDiffusionServiceSpec",
    "StableDiffusionServiceStatus",
    "kind_of",
    "load",
    "parse",
    "quantity",
]
