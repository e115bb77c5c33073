"""Fixtures for tests/distributed. The process harness itself is ``multiproc.spawn``."""

import pytest


@pytest.fixture(autouse=True)
def _restore_environ(restore_environ):
    """Every test here may build a ``DistEnv`` in this process (see ``tests/conftest.py``)."""
    yield
