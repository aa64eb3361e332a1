"""Shared inputs of the engine tests."""
from __future__ import annotations

import pytest

# Short English prompts: with the default model they end by eos, stop strings or length.
PROMPT_TEXTS = (
    "The capital of France is",
    "List three colors:",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "Once upon a time",
    "The quick brown fox",
    "Explain gravity in one sentence.",
    "import numpy as np",
    "My favourite food is",
    "Hello! How are you today?",
    "Translate to French: good morning",
)


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPT_TEXTS)
