"""Name, label and annotation rules of kube-apiserver (apimachinery ``validation``).

Each check returns the API server's message for a bad value, or None when it is fine.
"""

from __future__ import annotations

import re
from typing import Any

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def dns1123_label(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL.match(value):
        return "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"
    return None


def dns1123_subdomain(value: str) -> str | None:
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not value or not all(_LABEL.match(part) for part in value.split(".")):
        return "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
    return None


def dns1035_label(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1035.match(value):
        return "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with a letter"
    return None


def qualified_name(value: str) -> str | None:
    """A label or annotation key: an optional DNS subdomain prefix, '/', and a name of <= 63."""
    prefix, _, name = value.rpartition("/")
    if "/" in value and (not prefix or dns1123_subdomain(prefix)):
        return "a qualified name's prefix must be a DNS subdomain"
    if not name or len(name) > 63:
        return "name part must be no more than 63 characters and not empty"
    if not _QUALIFIED.match(name):
        return "name part must consist of alphanumeric characters, '-', '_' or '.'"
    return None


def label_value(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > 63:
        return "must be no more than 63 characters"
    if value and not _QUALIFIED.match(value):
        return "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.'"
    return None


def labels(values: Any, field: str) -> list[tuple[str, str]]:
    errors = []
    for key, value in (values or {}).items():
        if msg := qualified_name(key):
            errors.append((f"{field}[{key}]", msg))
        if msg := label_value(value):
            errors.append((f"{field}[{key}]", f"Invalid value: {value!r}: {msg}"))
    return errors


def annotation_keys(values: Any, field: str) -> list[tuple[str, str]]:
    errors = [(f"{field}[{k}]", msg) for k in (values or {}) if (msg := qualified_name(k))]
    if sum(len(k) + len(str(v)) for k, v in (values or {}).items()) > 256 * 1024:
        errors.append((field, "Too long: must have at most 262144 bytes"))
    return errors
