"""Shared pytest fixtures: tiny models, the bundled real model, and the task data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import make_tiny_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BIGBENCH_DIR = SHARED_DATA / "bigbench"


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct in fp32, loaded once per test session."""
    from evals.models import BundledModelMissing, load_model

    try:
        model, tokenizer = load_model("smollm2-135m", dtype="float32")
    except BundledModelMissing as error:
        pytest.skip(str(error))
    return model, tokenizer


@pytest.fixture
def bigbench_dir() -> Path:
    if not BIGBENCH_DIR.is_dir():
        pytest.skip(f"BIG-bench task files not found at {BIGBENCH_DIR}")
    return BIGBENCH_DIR
