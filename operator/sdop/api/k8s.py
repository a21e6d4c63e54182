"""Kubernetes value formats, so a CR that passes ``sdop validate`` also passes the API server.

Each format is a pattern the CRD schema carries (the API server checks it at admission)
and pydantic checks the same way (``sdop validate`` and the operator). Map keys (label and
annotation keys) cannot carry a pattern in a structural schema, so those maps get a CEL
rule as well (``key_rule``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, Field

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
#: RFC 1123 subdomain: ConfigMap, Secret, PVC, StorageClass, PriorityClass, IngressClass names.
DNS_SUBDOMAIN = rf"^{_LABEL}(\.{_LABEL})*$"
_NAME_PART = r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]"
#: A label or annotation key: an optional DNS subdomain prefix and '/', then a name of <= 63.
QUALIFIED_NAME = rf"^({_LABEL}(\.{_LABEL})*/)?{_NAME_PART}$"
#: A label value: empty, or <= 63 alphanumerics with '-', '_' or '.' inside.
LABEL_VALUE = rf"^({_NAME_PART})?$"
#: An extended resource name: a domain prefix is required (``nvidia.com/gpu``).
EXTENDED_RESOURCE = rf"^{_LABEL}(\.{_LABEL})*/{_NAME_PART}$"
#: An image repository as the container runtime parses it: an optional registry host (and
#: port), then lower-case path components. No spaces, no upper case.
_COMPONENT = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
IMAGE_REPOSITORY = rf"^({_LABEL}(\.{_LABEL})*(:[0-9]+)?/)?{_COMPONENT}(/{_COMPONENT})*$"
IMAGE_TAG = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"

DnsSubdomain = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
#: RFC 1123 label: namespace names.
DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=f"^{_LABEL}$")]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]
#: A Gateway API hostname: a DNS name, optionally starting with a '*.' wildcard label.
Hostname = Annotated[str, Field(min_length=1, max_length=253, pattern=rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")]


def _qualified_keys(values: dict[str, Any]) -> dict[str, Any]:
    bad = [k for k in values if len(k) > 317 or not re.match(QUALIFIED_NAME, k)]
    if bad:
        raise ValueError(
            f"invalid key(s) {', '.join(repr(k) for k in bad)}: a key is an optional DNS subdomain prefix and '/', "
            "then a name of at most 63 alphanumerics, '-', '_' or '.' (starting and ending alphanumeric)"
        )
    return values


# CEL string literals need the regex's backslashes escaped.
_CEL_QUALIFIED_NAME = QUALIFIED_NAME.replace("\\", "\\\\")


def key_rule(what: str) -> dict[str, Any]:
    """The CEL rule the CRD carries for a map whose keys are label or annotation keys."""
    return {
        "x-kubernetes-validations": [
            {
                "rule": f"self.all(k, k.size() <= 317 && k.matches('{_CEL_QUALIFIED_NAME}'))",
                "message": f"{what} keys must be qualified names (an optional DNS subdomain prefix and '/', "
                "then a name of at most 63 characters)",
            }
        ]
    }


#: Labels: keys qualified names, values label values.
Labels = Annotated[dict[str, LabelValue], AfterValidator(_qualified_keys)]
#: Annotations: keys qualified names, any string values.
Annotations = Annotated[dict[str, str], AfterValidator(_qualified_keys)]
