"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real corpora for tests: ``$SRP_SHARED_DATA``, default ``<repo>/../shared/data``."""
    path = Path(os.environ.get("SRP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data directory {path} not found (set SRP_SHARED_DATA to its location)")
    return path
