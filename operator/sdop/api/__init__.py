"""The StableDiffusionService API: pydantic models, the one definition of every field."""

from .resource import (API_VERSION, FIELD_MANAGER, GROUP, KIND, PLURAL, VERSION, SpecError,
                       StableDiffusionService, parse)
from .spec import StableDiffusionServiceSpec
from .status import StableDiffusionServiceStatus

__all__ = [
    "API_VERSION", "FIELD_MANAGER", "GROUP", "KIND", "PLURAL", "VERSION", "SpecError",
    "StableDiffusionService", "StableDiffusionServiceSpec", "StableDiffusionServiceStatus", "parse",
]
