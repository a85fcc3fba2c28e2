"""Parameter counts of two official sizes, shared by the memory planner's tests (meta device, no weights)."""

from __future__ import annotations

import pytest

from toolkit.memory import SIZES, ModelStats


@pytest.fixture(scope="package")
def small() -> ModelStats:
    return ModelStats.from_config(SIZES["small"].config(), "whisper-small")


@pytest.fixture(scope="package")
def large_v3() -> ModelStats:
    return ModelStats.from_config(SIZES["large-v3"].config(), "whisper-large-v3")
