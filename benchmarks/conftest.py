"""Fixtures of the benchmark suites: the bundled SmolLM2-135M and its benchmark prompts."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct in fp32, loaded once; the suite is skipped when it is not installed."""
    from evals.models import BundledModelMissing, load_model

    try:
        return load_model("smollm2-135m", dtype="float32")
    except BundledModelMissing as error:
        pytest.skip(str(error))
