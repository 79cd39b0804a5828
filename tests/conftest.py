"""Test-wide setup: an isolated CHORUS_HOME per session, with the converted-model cache shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Keep user tasks, artifacts and databases of a test run away from the developer's own state,
    # but reuse the converted SmolLM2 / tiny-llama cache (conversion takes ~20 s).
    home = Path(os.environ.get("CHORUS_TEST_HOME", "/tmp/chorus-test-home")) / str(os.getpid())
    os.environ["CHORUS_HOME"] = str(home)
    os.environ.setdefault("CHORUS_MODEL_CACHE_DIR", str(REPO / ".chorus" / "models"))
    from shared.config import get_settings

    get_settings.cache_clear()


@pytest.fixture(scope="session")
def tiny_base():
    """The tiny random Llama (float32, CPU) shared by fast tests. Do not leave adapters attached."""
    from shared.ml.models import Base

    return Base.load("tiny-llama", "none", "cpu")
