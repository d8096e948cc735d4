"""pytest fixtures for every test module (shared helper functions live in tests/helpers.py)."""
import sys

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; tests that call train() in-process need a fresh one each."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
