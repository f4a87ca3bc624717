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


@pytest.fixture(scope="session")
def shakespeare_dataset(shared_data: Path, tmp_path_factory) -> str:
    """tinyshakespeare as a Megatron indexed dataset (real preprocessing, shipped tokenizer)."""
    from megatron_srp.data.preprocess import preprocess
    from megatron_srp.data.tokenizer import SRPTokenizer, default_tokenizer_dir

    prefix = tmp_path_factory.mktemp("data") / "shakespeare"
    preprocess([shared_data / "tinyshakespeare" / "input.txt"], prefix,
               SRPTokenizer.from_dir(default_tokenizer_dir()), workers=2, progress=False)
    return str(prefix)
