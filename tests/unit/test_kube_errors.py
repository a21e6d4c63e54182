"""Each API error class is its own exception; retrying is decided by the class, not by status checks."""

from __future__ import annotations

import pytest

from sdop.reconcile.kube import (
    Conflict,
    Forbidden,
    Gone,
    KubeError,
    NotFound,
    ServerError,
    Unauthorized,
    Unprocessable,
    Unreachable,
    error_for,
)


@pytest.mark.parametrize(
    ("status", "cls", "retryable"),
    [
        (0, Unreachable, True),
        (400, KubeError, False),
        (401, Unauthorized, False),
        (403, Forbidden, False),
        (404, NotFound, False),
        (409, Conflict, True),
        (410, Gone, True),
        (422, Unprocessable, False),
        (429, ServerError, True),
        (500, ServerError, True),
        (503, ServerError, True),
    ],
)
def test_error_for_maps_each_status_to_its_class(status, cls, retryable):
    e = error_for(status, "PATCH /apis/apps/v1/namespaces/a/deployments/b: nope")
    assert type(e) is cls and isinstance(e, KubeError)
    assert e.retryable is retryable and e.status == status and "deployments/b" in str(e)
