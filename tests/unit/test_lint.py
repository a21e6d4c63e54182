"""No unused imports, undefined names or similar slips anywhere in the code (pyflakes)."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

from pyflakes import api, reporter

from sdtesting.examples import ROOT


def test_pyflakes_is_clean():
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out):
        count = api.checkRecursive(
            [str(ROOT / d) for d in ("operator", "inference_image", "tests", "bench")], reporter.Reporter(out, err)
        )
    assert count == 0, out.getvalue() + err.getvalue()
