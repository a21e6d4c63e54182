"""Guardrails that are not one linter's rule."""

from __future__ import annotations

import re

from sdtesting.examples import ROOT

SUPPRESSION = re.compile(r"#\s*(noqa|type:\s*ignore)\b(?P<rest>.*)$")


def test_every_noqa_and_type_ignore_names_a_code_and_its_reason():
    bad = []
    for folder in ("operator", "inference_image", "testing", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                m = SUPPRESSION.search(line)
                if m is None:
                    continue
                rest = m.group("rest")
                # A code ("noqa: BLE001", "type: ignore[arg-type]") and a reason after it.
                if not re.match(r"(:\s*[A-Z]+\d+|\[[a-z-]+(,\s*[a-z-]+)*\])\s*(-|#)\s*\S", rest):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "suppressions without a code and a reason:\n" + "\n".join(bad)
