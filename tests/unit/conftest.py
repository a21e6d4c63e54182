"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest


@pytest.fixture
def keys(tmp_path):
    """An API keys file (SDSERVE_API_KEYS_FILE) with two principals, alice and bob."""
    (tmp_path / "keys").write_text("alice:key-alice\nbob:key-bob\n")
    return str(tmp_path / "keys")
