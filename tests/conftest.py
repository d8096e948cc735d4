"""pytest fixtures for every test module (shared helper functions live in tests/helpers.py), and the ``long`` marker:
tests of a minute or more (the U-ViT and DiT quickstarts shortened) run with ``--long`` only, so the default suite
stays within CI's time on 2 cores; ``python -m pytest -q --long`` runs everything."""
import sys

import pytest


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="also run the tests marked long (a minute or more each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "long: a test of a minute or more on 2 CPU cores; runs with --long")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long test (a minute or more): run with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; tests that call train() in-process need a fresh one each."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture
def private_caches(tmp_path, monkeypatch):
    """No test reads or writes the user's caches: torch hub (Inception weights) and the evaluation cache (modules
    that run the evaluation use it for every test: ``pytestmark = pytest.mark.usefixtures("private_caches")``)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
