"""Kubernetes resource quantities as the API server stores them (apimachinery ``resource.Quantity``).

The server parses a quantity (``"1.5"``, ``"1536Mi"``, ``2``, ``"1e3"``) and writes back its
canonical form: the input's format (binary suffix, decimal suffix or exponent), the largest
suffix that keeps the mantissa an integer, and at most nanounit precision (rounded up).
So ``cpu: "1.5"`` reads back as ``"1500m"``, ``memory: "1024Mi"`` as ``"1Gi"`` and
``"0.5Gi"`` as ``"512Mi"``.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal

_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_SHAPE = re.compile(r"^([+-]?[0-9.]+)(([eE][+-]?[0-9]+)|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|)$")


class QuantityError(ValueError):
    pass


def parse(value: str | int | float) -> tuple[Decimal, str]:
    """The value and the format it was written in: ``BinarySI``, ``DecimalSI`` or ``DecimalExponent``."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a quantity")
    text = str(value).strip() if isinstance(value, (int, float)) else value
    m = _SHAPE.match(text) if isinstance(text, str) else None
    if not m or m.group(1) in (".", "+.", "-.") or m.group(1).count(".") > 1:
        raise QuantityError(
            "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
        )
    number, suffix = Decimal(m.group(1)), m.group(2)
    if suffix in _BINARY:
        return number * (2 ** _BINARY[suffix]), "BinarySI"
    if m.group(3):
        return number.scaleb(int(suffix[1:])), "DecimalExponent"
    return number.scaleb(_DECIMAL[suffix]), "DecimalSI"


def canonical(value: str | int | float) -> str:
    amount, fmt = parse(value)
    amount = amount.scaleb(9).to_integral_value(ROUND_CEILING).scaleb(-9)  # nanounit precision
    if amount == 0:
        return "0"
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    if fmt == "BinarySI" and amount >= 1024 and amount == amount.to_integral_value():
        whole = int(amount)
        for suffix, bits in sorted(_BINARY.items(), key=lambda kv: -kv[1]):
            if whole % (1 << bits) == 0:
                return f"{sign}{whole >> bits}{suffix}"
        return f"{sign}{whole}"
    # Decimal: the largest exponent (a multiple of 3) that leaves an integer mantissa.
    exponent = -9
    while exponent < 18 and (amount.scaleb(-(exponent + 3))) == amount.scaleb(-(exponent + 3)).to_integral_value():
        exponent += 3
    mantissa = int(amount.scaleb(-exponent))
    if fmt == "DecimalExponent":
        return f"{sign}{mantissa}" + (f"e{exponent}" if exponent else "")
    suffix = {v: k for k, v in _DECIMAL.items()}[exponent]
    return f"{sign}{mantissa}{suffix}"
