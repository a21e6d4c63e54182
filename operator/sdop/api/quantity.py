"""Kubernetes resource quantities compared by value: ``"1.5"`` and ``"1500m"`` are one CPU and a half.

The API server stores a quantity in its canonical form, so what the operator rendered and
what it reads back can differ in spelling only.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIX = {
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}
_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$"
)


def value(quantity: str | int | float) -> Decimal | None:
    """The amount a quantity stands for, or None when it is not a quantity."""
    if isinstance(quantity, bool):
        return None
    m = _QUANTITY.match(str(quantity))
    if not m:
        return None
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        return None
    if m.group(2):
        return number.scaleb(int(m.group(2)[1:]))
    return number * _SUFFIX[m.group(3) or ""]


def equal(a: str | int | float, b: str | int | float) -> bool:
    va, vb = value(a), value(b)
    return va is not None and va == vb
