"""The StableDiffusionService resource: names, versions and the whole-object model."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from .base import ApiModel
from .spec import StableDiffusionServiceSpec
from .status import StableDiffusionServiceStatus

GROUP = "sdop.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "StableDiffusionService"
PLURAL = "stablediffusionservices"
SINGULAR = "stablediffusionservice"
SHORT_NAMES = ["sds"]
CATEGORIES = ["sdop", "ml"]
FIELD_MANAGER = "sdop"


class Metadata(ApiModel):
    """The part of ObjectMeta rendering needs."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    #: A DNS-1035 label: the Service takes this name (the CRD has the same rule).
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    namespace: str = "default"
    uid: str | None = None
    generation: int = 1
    labels: dict[str, str] = Field(default_factory=dict)


class StableDiffusionService(ApiModel):
    """A whole CR as read from YAML or the API server."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    api_version: str = Field(API_VERSION, pattern=f"^{API_VERSION}$")
    kind: str = Field(KIND, pattern=f"^{KIND}$")
    metadata: Metadata
    spec: StableDiffusionServiceSpec
    status: StableDiffusionServiceStatus | None = None


class SpecError(ValueError):
    """A CR the operator cannot act on, with the fields at fault."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))

    @property
    def fields(self) -> list[str]:
        return [p for p, _ in self.problems]


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse(obj: dict[str, Any]) -> StableDiffusionService:
    """Validate a CR dict; raise SpecError naming each bad field (camelCase paths).

    The status is the operator's own record (the rollback decision lives there): one it cannot
    read (written by another version, or by hand) is dropped rather than blocking the spec."""
    status = obj.get("status")
    if status is not None:
        try:
            StableDiffusionServiceStatus.model_validate(status)
        except ValidationError:
            obj = {k: v for k, v in obj.items() if k != "status"}
    try:
        return StableDiffusionService.model_validate(obj)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            problems.append((_loc(loc) or "(root)", msg))
        raise SpecError(problems) from None
