from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def load_fixture(name: str) -> dict:
    path = FIXTURES / f"{name}.pt"
    if not path.is_file():
        pytest.fail(f"parity fixture {path} is missing: the tests expect the project's shared/ folder beside the repo")
    return torch.load(path, weights_only=True)
